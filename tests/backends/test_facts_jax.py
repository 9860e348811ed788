"""JAX conventions, pinned on the real lax ops; the jax preset checked against them."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck.backends.jax import dimension_numbers

from ._support import random_weights, reference


def test_default_dimension_numbers_are_nchw_oihw_and_correlate(jax):
    from jax import lax

    spec = ec.spec("jax:conv", channels=3, spatial=(5, 6), kernel_size=(3, 2), units=4, bias=False)
    assert spec.kernel_layout == "OIHW" and spec.data_format == "channels_first", "jax preset: NCHW map, OIHW kernel"
    kernel, _, x = random_weights(spec)
    y = np.asarray(lax.conv_general_dilated(x, kernel, (1, 1), "VALID"))  # dimension_numbers=None
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: lax.conv_general_dilated defaults to NCHW/OIHW/NCHW and cross-correlates")


@pytest.mark.parametrize("preset", ["keras", "tflite", "torch"])
def test_dimension_numbers_read_any_stored_layout(jax, preset):
    from jax import lax

    spec = ec.spec(f"{preset}:conv", channels=3, spatial=(5, 6), kernel_size=(3, 2), units=4, bias=False, stride=(2, 1))
    kernel, _, x = random_weights(spec)
    dn = dimension_numbers(spec)
    assert dn[1] == spec.kernel_layout, "the jax backend passes a plain kernel in its stored layout"
    y = np.asarray(lax.conv_general_dilated(x, kernel, spec.stride, "VALID", dimension_numbers=dn))
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: rhs spec {spec.kernel_layout!r} makes lax read a {preset} kernel as stored")


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose_with_transpose_kernel_reads_iohw(jax, stride):
    from jax import lax

    spec = ec.spec("jax:conv_transpose", channels=3, spatial=(4, 5), kernel_size=(3, 2), units=5, stride=stride, bias=False)
    assert spec.kernel_layout == "IOHW", "jax preset: transposed kernel (in, out, h, w)"
    kernel, _, x = random_weights(spec)
    y = np.asarray(lax.conv_transpose(x, kernel, (stride, stride), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                      transpose_kernel=True))
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: lax.conv_transpose(transpose_kernel=True, OIHW) takes an IOHW-stored kernel")


@pytest.mark.parametrize("stride", [1, 2])
def test_flax_conv_transpose_uses_its_kernel_as_is_so_it_convolves(jax, stride):
    # flax.linen.ConvTranspose calls lax.conv_transpose(..., transpose_kernel=False) with an HWIO (in, out) kernel.
    from jax import lax

    spec = ec.spec("flax:conv_transpose", channels=3, spatial=(4, 5), kernel_size=(3, 2), units=5, stride=stride, bias=False)
    assert (spec.kernel_layout, spec.op) == ("HWIO", "convolve"), "flax preset: transposed kernel HWIO, flipped vs torch"
    kernel, _, x = random_weights(spec)
    y = np.asarray(lax.conv_transpose(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      transpose_kernel=False))
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: lax.conv_transpose(transpose_kernel=False) is torch's transposed conv "
                                       "with the kernel flipped in space")
    torch_kernel = ec.plan(spec, ec.spec("torch:conv_transpose", channels=3, spatial=(4, 5), kernel_size=(3, 2),
                                         units=5, stride=stride, bias=False)).code()
    assert "::-1" in torch_kernel, torch_kernel


def test_depthwise_is_feature_group_count(jax):
    from jax import lax

    spec = ec.spec("jax:depthwise", channels=3, spatial=(5, 5), kernel_size=(3, 2), multiplier=2, bias=False)
    assert spec.kernel_shape == (6, 1, 3, 2), "jax preset: depthwise kernel (C*M, 1, kh, kw)"
    kernel, _, x = random_weights(spec)
    y = np.asarray(lax.conv_general_dilated(x, kernel, (1, 1), "VALID", feature_group_count=3))
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: feature_group_count=C gives output channel c*M + m from input channel c")


def test_dense_is_reshape_matmul_in_out(jax):
    spec = ec.spec("jax:dense", channels=3, spatial=(2, 4), units=5)
    assert (spec.flatten, spec.kernel_layout) == ("CHW", "IO"), "jax preset: x.reshape(n, -1) of NCHW @ (in, out)"
    kernel, bias, x = random_weights(spec)
    y = np.asarray(jax.numpy.asarray(x).reshape(2, -1) @ kernel + bias)
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)


def test_float64_needs_enable_x64(jax):
    x = np.ones(3)
    assert jax.numpy.asarray(x).dtype == np.float32, "fact: without x64 JAX computes float64 input in float32"
    spec = ec.spec("jax:dense", channels=3, units=2)
    layer = backends.get("jax").build(spec, "float64")
    layer.set_weights(np.full((3, 2), 1 + 2.0**-40), np.zeros(2))
    y = layer(np.ones((1, 3)))
    assert y.dtype == np.float64 and y[0, 0] == 3 * (1 + 2.0**-40), "the jax backend computes float64 under enable_x64"
    assert jax.numpy.asarray(x).dtype == np.float32, "enable_x64 is scoped to the backend's call"

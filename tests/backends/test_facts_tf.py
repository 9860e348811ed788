"""TensorFlow raw-op conventions (tf.nn), pinned on the real ops; the tf preset checked against them.

Which of these ops run in which dtype, and how they round and sum, depends on the CPU (oneDNN
or Eigen kernels): that is probed, and tests/backends/test_probe.py checks the probes against TF.
"""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends

from ._support import random_weights, reference, skip_where_it_cannot_run


def test_reshape_of_nhwc_flattens_hwc_and_matmul_kernel_is_in_out(tf):
    spec = ec.spec("tf:dense", channels=3, spatial=(2, 4), units=5)
    assert (spec.data_format, spec.flatten, spec.kernel_layout) == ("channels_last", "HWC", "IO"), "tf preset: NHWC, HWC, (in, out)"
    kernel, bias, x = random_weights(spec)
    y = tf.nn.bias_add(tf.matmul(tf.reshape(x, (2, -1)), kernel), bias).numpy()
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: tf.reshape + tf.matmul with an (in, out) kernel is tf:dense")


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_filters_are_spatial_in_out_and_correlate(tf, rank):
    spatial, ks = (6, 5, 4)[:rank], (3, 2, 2)[:rank]
    spec = ec.spec("tf:conv", channels=3, spatial=spatial, kernel_size=ks, units=4, padding="same")
    kernel, _, x = random_weights(spec.replace(bias=False))
    op = (tf.nn.conv1d, tf.nn.conv2d, tf.nn.conv3d)[rank - 1]
    y = op(x, kernel, [1] * (rank + 2) if rank == 3 else 1, "SAME").numpy()
    np.testing.assert_allclose(y, reference(spec.replace(bias=False), kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: tf.nn.conv{rank}d cross-correlates with a {spec.kernel_layout} filter, SAME pads extra after")


def test_conv_transpose_filter_is_spatial_out_in(tf):
    spec = ec.spec("tf:conv_transpose", channels=3, spatial=(4, 3), kernel_size=(3, 2), units=2, stride=2, bias=False)
    assert spec.kernel_layout == "HWOI", "tf preset: conv_transpose filter (h, w, out, in)"
    kernel, _, x = random_weights(spec)
    out = (2, *spec.output_spatial, 2)
    y = tf.nn.conv_transpose(x, kernel, out, strides=2, padding="VALID").numpy()
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: tf.nn.conv_transpose takes a (h, w, out, in) filter, unflipped")


def test_depthwise_filter_is_spatial_in_multiplier(tf):
    spec = ec.spec("tf:depthwise", channels=3, spatial=(5, 6), kernel_size=(3, 2), multiplier=2, bias=False)
    assert spec.kernel_shape == (3, 2, 3, 2), "tf preset: depthwise filter (h, w, in, multiplier)"
    kernel, _, x = random_weights(spec)
    y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID").numpy()
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: depthwise_conv2d output channel c*M + m reads input channel c")


def test_grouped_transposed_conv_filter_is_spatial_out_per_group_in(tf):
    spec = ec.spec("tf:conv_transpose", channels=4, spatial=(4, 3), kernel_size=(3, 2), units=6, groups=2, stride=2)
    kernel, bias, x = random_weights(spec)
    out = (2, *spec.output_spatial, 6)
    y = skip_where_it_cannot_run(lambda: tf.nn.conv_transpose(x, kernel, out, strides=2, padding="VALID").numpy(),
                                 "TF's grouped Conv2DBackpropInput")
    np.testing.assert_allclose(tf.nn.bias_add(y, bias).numpy(), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: conv_transpose with a (*k, out/groups, in) filter is a grouped transposed conv")


def test_depthwise_with_stride_and_dilation_is_not_the_spec(tf):
    spec = ec.spec("tf:depthwise", channels=2, spatial=(9, 8), kernel_size=(3, 2), stride=2, dilation=2, bias=False)
    assert backends.get("tf").unsupported(spec, "float32"), "the tf backend should refuse it"
    kernel, _, x = random_weights(spec)
    with pytest.warns(UserWarning, match="strides must be 1"):
        y = tf.nn.depthwise_conv2d(x, kernel, [1, 2, 2, 1], "VALID", dilations=(2, 2)).numpy()
    assert y.shape[1:] != spec.output_shape, "fact: depthwise_conv2d with strides and dilations > 1 is not that layer"


def test_the_backend_pads_explicitly_so_strided_same_conv3d_is_right_in_every_dtype(tf):
    """TF's Eigen Conv3D halves an unclamped negative total pad for 'SAME'; the backend never asks TF for 'SAME'."""
    spec = ec.spec("tf:conv", channels=1, spatial=(5, 6, 6), kernel_size=(1, 1, 2), units=2, stride=(2, 3, 2),
                   padding="same", bias=False)
    kernel, _, x = random_weights(spec, dtype="float64")
    layer = backends.get("tf").build(spec, "float64")
    layer.set_weights(kernel, None)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, None, x), rtol=1e-9, atol=1e-9)

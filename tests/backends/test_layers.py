"""The Layer interface on every backend: weights round-trip in the stored layout, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck._arrays import aligned_empty

from ._support import BACKEND_NAMES, random_weights, reference, require

SPECS = {
    "dense-OI-any-order": ec.spec("torch:dense", channels=2, spatial=(3, 2), units=3, flatten="WCH"),
    "dense-IO": ec.spec("keras_cf:dense", channels=2, spatial=(3, 2), units=3),
    "conv-OHWI-convolve": ec.spec("tflite:conv", channels=2, spatial=(4, 4), kernel_size=(2, 3), units=3, op="convolve"),
    "depthwise-HWIM": ec.spec("keras:depthwise", channels=2, spatial=(5, 4), kernel_size=(3, 2), multiplier=2),
    "transposed-HWOI": ec.spec("keras:conv_transpose", channels=3, spatial=(3,), kernel_size=(2,), units=2, bias=False),
}


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_weights_round_trip_and_forward(name, spec_name):
    backend = require(name)
    spec = SPECS[spec_name]
    kernel, bias, x = random_weights(spec, seed=3)
    layer = backend.build(spec, "float32")
    layer.set_weights(kernel, bias)
    k2, b2 = layer.get_weights()
    np.testing.assert_array_equal(k2, kernel, err_msg=f"{name}: get_weights must return the kernel in {spec.kernel_layout}")
    assert (b2 is None) == (bias is None)
    if bias is not None:
        np.testing.assert_array_equal(b2, bias)
    y = layer(x)
    assert y.dtype == np.float32 and y.shape == (2, *spec.output_shape)
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_copy_false_hands_over_and_copy_true_does_not(name, spec_name):
    """``copy=True`` detaches the layer from the caller's arrays; ``copy=False`` computes the same, call after call."""
    backend = require(name)
    spec = SPECS[spec_name]
    layer = backend.build(spec, "float32")
    for seed in (3, 4):  # the second hand-over replaces the first (a TF variable that aliased a buffer)
        kernel, bias, x = random_weights(spec, seed=seed)
        shared = aligned_empty(spec.kernel_shape, np.float32)
        shared[...] = kernel
        layer.set_weights(shared, bias, copy=False)
        np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name}: copy=False, weights of seed {seed}")
    layer.set_weights(kernel, bias)
    kernel += 1
    if bias is not None:
        bias += 1
    np.testing.assert_allclose(layer(x), reference(spec, kernel - 1, None if bias is None else bias - 1, x),
                               rtol=1e-4, atol=1e-4, err_msg=f"{name}: copy=True must not read the caller's arrays later")


@pytest.mark.parametrize(("name", "preset"), [("keras", "keras:dense"), ("torch", "torch:conv"), ("numpy", "tflite:conv")])
def test_copy_false_reads_a_native_aligned_kernel_in_place(name, preset):
    """What makes the explorer fast on VGG fc6: no 411 MB copy per call (TF via DLPack, torch via set_)."""
    backend = require(name)
    spec = ec.spec(preset, channels=3, spatial=(2, 2), units=4, bias=False)
    kernel, _, x = random_weights(spec, seed=5)
    shared = aligned_empty(spec.kernel_shape, np.float32)
    shared[...] = kernel
    layer = backend.build(spec, "float32")
    layer.set_weights(shared, None, copy=False)
    before = layer(x)
    shared *= 2
    np.testing.assert_allclose(layer(x), 2 * before, rtol=1e-5, atol=1e-5,
                               err_msg=f"{name}: a native, aligned float32 kernel should be read in place")


def test_tensorflow_never_gets_a_misaligned_buffer(tf):
    """A misaligned DLPack buffer aborts TensorFlow: such arrays are copied instead."""
    from equivcheck.backends._tensorflow import tensor_in_place

    raw = aligned_empty((4097,), np.float32)
    assert tensor_in_place(raw[1:]) is None  # 4 bytes past a 64-byte boundary
    assert tensor_in_place(raw[:4096].reshape(64, 64)[:, ::2]) is None  # not contiguous
    t = tensor_in_place(raw[:4096])
    raw[:4096] = 7
    assert float(tf.reduce_sum(t)) == 7 * 4096


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_bad_arguments_are_one_line_spec_errors(name):
    backend = require(name)
    spec = ec.spec("torch:conv", channels=2, spatial=(4, 4), kernel_size=(3, 3), units=3)
    layer = backend.build(spec, "float32")
    with pytest.raises(ec.SpecError, match=r"kernel shape=\(3, 3\)"):
        layer.set_weights(np.zeros((3, 3), "float32"), np.zeros(3, "float32"))
    with pytest.raises(ec.SpecError, match="bias=None"):
        layer.set_weights(np.zeros(spec.kernel_shape, "float32"), None)
    with pytest.raises(ec.SpecError, match=r"input shape=\(1, 4, 4, 2\)"):
        layer(np.zeros((1, 4, 4, 2), "float32"))
    with pytest.raises(ec.SpecError, match="dtype='int8'"):
        backend.build(spec, "int8")


def test_unsupported_spec_is_refused_at_build(keras):
    spec = ec.spec("keras:conv_transpose", channels=4, spatial=(4,), kernel_size=(3,), units=4, groups=2)
    reason = backends.get("keras").unsupported(spec, "float32")
    assert reason and "groups" in reason
    with pytest.raises(ec.SpecError, match="has no groups argument"):
        backends.get("keras").build(spec, "float32")

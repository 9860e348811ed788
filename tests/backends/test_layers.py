"""The Layer interface on every backend: weights round-trip in the stored layout, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends

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

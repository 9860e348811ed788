"""Keras 3 (on TensorFlow) conventions, pinned on the real layers; the keras presets checked against them.

Each ``unsupported`` rule of the keras backend (what Keras's API refuses everywhere) is pinned too: the
real layer really fails there. Which layers run in which dtype and layout on this CPU is probed
instead, and tests/backends/test_probe.py checks the probes against Keras.
"""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends

from ._support import random_weights, reference, skip_where_it_cannot_run

CF, CL = "channels_first", "channels_last"


def _run(keras, layer, kernel, bias, x):
    layer.build((None, *x.shape[1:]))
    layer.set_weights([kernel] + ([] if bias is None else [bias]))
    return np.asarray(keras.ops.convert_to_numpy(layer(x)))


@pytest.mark.parametrize("data_format", [CF, CL])
def test_flatten_always_reads_channels_last(keras, data_format):
    x = np.arange(2 * 3 * 4 * 5, dtype="float32").reshape(2, 3, 4, 5)  # (N, C, H, W) or (N, H, W, C)
    flat = keras.ops.convert_to_numpy(keras.layers.Flatten(data_format=data_format)(x))
    expected = x.transpose(0, 2, 3, 1).reshape(2, -1) if data_format == CF else x.reshape(2, -1)
    np.testing.assert_array_equal(
        flat, expected, err_msg=f"fact: Keras 3 Flatten(data_format={data_format!r}) flattens in H, W, C order"
    )
    preset = "keras_cf" if data_format == CF else "keras"
    spec = ec.spec(f"{preset}:dense", channels=3, spatial=(4, 5), units=2)
    assert (spec.data_format, spec.flatten) == (data_format, "HWC"), f"{preset} preset: Flatten order is HWC"


@pytest.mark.parametrize("preset", ["keras", "keras_cf"])
def test_dense_kernel_is_in_out(keras, preset):
    spec = ec.spec(f"{preset}:dense", channels=3, spatial=(2, 4), units=5)
    kernel, bias, x = random_weights(spec)
    flatten = keras.layers.Flatten(data_format=spec.data_format)
    layer = keras.layers.Dense(5)
    y = _run(keras, layer, kernel, bias, keras.ops.convert_to_numpy(flatten(x)))
    assert tuple(layer.kernel.shape) == spec.kernel_shape == (24, 5), "fact: Keras Dense kernel is (in, out)"
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: Flatten(data_format={spec.data_format!r}) + Dense realise {preset}:dense")


@pytest.mark.parametrize("data_format", [CF, CL])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_kernel_is_spatial_in_out_and_correlates(keras, rank, data_format):
    spatial, ks = (5, 6, 4)[:rank], (2, 3, 2)[:rank]
    preset = "keras_cf" if data_format == CF else "keras"
    spec = ec.spec(f"{preset}:conv", channels=3, spatial=spatial, kernel_size=ks, units=4, stride=2)
    layer = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)[rank - 1](4, ks, strides=2, data_format=data_format)
    kernel, bias, x = random_weights(spec)
    y = skip_where_it_cannot_run(lambda: _run(keras, layer, kernel, bias, x), f"Keras Conv{rank}D({data_format})")
    assert tuple(layer.kernel.shape) == spec.kernel_shape, f"fact: Keras Conv{rank}D kernel is {spec.kernel_layout}"
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: Keras Conv{rank}D({data_format}) cross-correlates with a (*k, in, out) kernel")


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_transpose_kernel_is_spatial_out_in(keras, rank):
    spatial, ks = (4, 3, 3)[:rank], (3, 2, 2)[:rank]
    spec = ec.spec("keras:conv_transpose", channels=3, spatial=spatial, kernel_size=ks, units=2, stride=2, output_padding=1)
    cls = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)[rank - 1]
    layer = cls(2, ks, strides=2, output_padding=1, data_format=CL)
    kernel, bias, x = random_weights(spec)
    y = _run(keras, layer, kernel, bias, x)
    assert tuple(layer.kernel.shape) == spec.kernel_shape, f"fact: Keras Conv{rank}DTranspose kernel is (*k, out, in)"
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: Keras Conv{rank}DTranspose scatters through a (*k, out, in) kernel unflipped")


@pytest.mark.parametrize("rank", [1, 2])
def test_depthwise_kernel_is_spatial_in_multiplier(keras, rank):
    spatial, ks = (6, 5)[:rank], (3, 2)[:rank]
    spec = ec.spec("keras:depthwise", channels=3, spatial=spatial, kernel_size=ks, multiplier=2)
    layer = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)[rank - 1](ks, depth_multiplier=2, data_format=CL)
    kernel, bias, x = random_weights(spec)
    y = _run(keras, layer, kernel, bias, x)
    assert tuple(layer.kernel.shape) == spec.kernel_shape, f"fact: DepthwiseConv{rank}D kernel is (*k, in, multiplier)"
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: DepthwiseConv output channel c*M + m reads input channel c")


def test_there_is_no_depthwise_conv3d(keras):
    assert not hasattr(keras.layers, "DepthwiseConv3D"), "fact: Keras has no DepthwiseConv3D (backend uses Conv3D(groups))"
    assert backends.get("keras").unsupported(ec.spec("keras:depthwise", channels=2, spatial=(3, 3, 3)), "float32") is None


def _keras_layer(spec, dtype):
    from equivcheck.backends.keras import KerasLayer

    layer = KerasLayer(spec, dtype)  # the real Keras layers, without the backend's refusal
    kernel, bias, x = random_weights(spec, dtype=dtype)
    layer.set_weights(kernel, bias)
    return layer(x), reference(spec, kernel, bias, x)


RULES = {
    "transposed-groups": (ec.spec("keras:conv_transpose", channels=4, spatial=(4, 4), kernel_size=(2, 2), units=4, groups=2),
                          "float32", "(weight shape|shape of the target variable).*(is not compatible|must match)"),
    "output-padding-vs-stride": (ec.spec("keras:conv_transpose", channels=2, spatial=(4,), kernel_size=(3,), units=2,
                                         dilation=2, output_padding=1), "float32", "output_padding"),
    "stride-and-dilation": (ec.spec("keras:conv", channels=2, spatial=(9,), kernel_size=(3,), units=2, dilation=2, stride=2),
                            "float32", "dilation_rate"),
}


@pytest.mark.parametrize("rule", RULES)
def test_unsupported_rules_are_real_failures(keras, rule):
    spec, dtype, match = RULES[rule]
    reason = backends.get("keras").unsupported(spec, dtype)
    assert reason, f"the keras backend should refuse {spec.describe()} in {dtype}"
    with pytest.raises(Exception, match=match):
        _keras_layer(spec, dtype)
    with pytest.raises(ec.SpecError, match="cannot build"):
        backends.get("keras").build(spec, dtype)


def test_channels_first_bias_lands_on_the_last_axis_when_sizes_coincide(keras):
    """Keras 3's TF ops.add takes a (1, C, 1, 1) bias for NHWC when the last axis also has C entries."""
    bad = ec.spec("keras_cf:conv", channels=2, spatial=(5, 6), kernel_size=(3, 3), units=4)  # output (3, 4): 4 == C
    good = bad.replace(out_channels=3)  # output (3, 4), 3 channels
    y, exact = skip_where_it_cannot_run(lambda: _keras_layer(bad, "float32"), "Keras Conv2D(channels_first)")
    assert np.abs(y - exact).max() > 0.1, "fact: Keras adds a channels_first bias along W when W == channels (bug fixed?)"
    assert backends.get("keras").unsupported(bad, "float32"), "the keras backend should refuse that shape"
    y, exact = _keras_layer(good, "float32")
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5, err_msg="channels_first bias is right otherwise")
    assert backends.get("keras").unsupported(good, "float32") is None


def test_a_strided_same_conv3d_that_computes_wrongly_here_is_not_run_here(keras):
    """TF's Eigen Conv3D (where oneDNN does not run it) halves an unclamped negative total pad for 'same'.

    Whether that kernel runs depends on the CPU and dtype: the probe must say "does not run" exactly
    where the real layer is wrong.
    """
    from equivcheck.backends.probe import probe

    bad = ec.spec("keras:conv", channels=1, spatial=(5, 6, 6), kernel_size=(1, 1, 2), units=2, stride=(1, 3, 1), padding="same")
    for dtype in ("float64", "float32"):
        y, exact = _keras_layer(bad, dtype)
        right = bool(np.abs(y - exact).max() < 1e-3)
        facts = probe("keras", bad, dtype)
        assert facts.runs == right, f"{dtype}: Keras is {'right' if right else 'wrong'} here, the probe says {facts.summary()}"
        if not right:
            assert "different result" in facts.reason

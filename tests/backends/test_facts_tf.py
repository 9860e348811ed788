"""TensorFlow raw-op conventions (tf.nn), pinned on the real ops; the tf preset checked against them.

Also pinned: each CPU limitation the tf backend reports, and the precision TF's CPU kernels
sum float16/bfloat16 in (what the comparator's bound uses for the tf and keras backends).
"""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck.compare import compare

from ._support import random_weights, reference


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


@pytest.mark.parametrize(("dtype", "works"), [("float32", True), ("bfloat16", True), ("float64", False), ("float16", False)])
def test_nchw_conv_only_in_onednn_dtypes(tf, dtype, works):
    x = tf.cast(tf.ones((1, 2, 5, 5)), dtype)
    w = tf.cast(tf.ones((3, 3, 2, 2)), dtype)
    if works:
        assert tf.nn.conv2d(x, w, 1, "VALID", data_format="NCHW").shape == (1, 2, 3, 3)
    else:
        with pytest.raises(tf.errors.UnimplementedError, match="NHWC"):
            tf.nn.conv2d(x, w, 1, "VALID", data_format="NCHW")
    spec = ec.spec("tf:conv", channels=2, spatial=(5, 5), units=2, kernel_size=(3, 3), data_format="channels_first")
    layer = backends.get("tf").build(spec, dtype)
    assert layer._native_cf is works, "the tf backend runs NCHW natively exactly where TF's CPU kernel takes it"


def _tf_layer(spec, dtype):
    from equivcheck.backends.tf import TFLayer

    layer = TFLayer(spec, dtype)  # the raw ops, without the backend's refusal
    kernel, bias, x = random_weights(spec, dtype=dtype)
    layer.set_weights(kernel, bias)
    return layer(x)


RULES = {
    "conv3d-groups": (ec.spec("tf:conv", channels=4, spatial=(4, 4, 4), kernel_size=(2, 2, 2), units=4, groups=2), "float32", "same depth"),
    "conv3d-dilated-float16": (ec.spec("tf:conv", channels=2, spatial=(5, 5, 5), kernel_size=(2, 2, 2), units=2, dilation=2),
                               "float16", "dilated rates of 1"),
    "transposed-dilated-float64": (ec.spec("tf:conv_transpose", channels=2, spatial=(4, 4), kernel_size=(2, 2), units=3,
                                           dilation=2), "float64", "dilation rates"),
    "transposed-groups-float64": (ec.spec("tf:conv_transpose", channels=4, spatial=(4, 4), kernel_size=(2, 2), units=4,
                                          groups=2), "float64", "grouped convolutions are not supported"),
    "depthwise-unequal-strides-float64": (ec.spec("tf:depthwise", channels=2, spatial=(7, 6), kernel_size=(2, 1),
                                                  stride=(2, 1)), "float64", "equal length strides"),
    "transposed3d-groups": (ec.spec("tf:conv_transpose", channels=4, spatial=(3, 3, 3), kernel_size=(2, 2, 2), units=4,
                                    groups=2), "float32", "depth|channels"),
}


@pytest.mark.parametrize("rule", RULES)
def test_unsupported_rules_are_real_failures(tf, rule):
    spec, dtype, match = RULES[rule]
    assert backends.get("tf").unsupported(spec, dtype), f"the tf backend should refuse {spec.describe()} in {dtype}"
    with pytest.raises(tf.errors.OpError, match=match):
        _tf_layer(spec, dtype)


def test_grouped_transposed_conv_runs_in_onednn_float32(tf):
    spec = ec.spec("tf:conv_transpose", channels=4, spatial=(4, 3), kernel_size=(3, 2), units=6, groups=2, stride=2)
    assert backends.get("tf").unsupported(spec, "float32") is None
    kernel, bias, x = random_weights(spec)
    layer = backends.get("tf").build(spec)
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: conv_transpose with a (*k, out/groups, in) filter is a grouped transposed conv")


def _ratio(spec, dtype, accumulate, *, second_rounding=True, seed=1):
    """Error / bound of the tf backend's ``spec`` layer; ``second_rounding`` tells the bound about the bias add."""
    from equivcheck.backends.tf import TFLayer
    from equivcheck.verify import draw

    rng = np.random.default_rng(seed)
    kernel, bias = draw(spec, dtype, rng)  # fan-in scaled: outputs and biases of one size, as in verify
    x = rng.standard_normal((4, *spec.input_shape)).astype(kernel.dtype)
    layer = TFLayer(spec, dtype)
    layer.set_weights(kernel, bias)
    y = layer(x)
    exact = reference(spec, kernel, bias, x)
    before_bias = reference(spec, kernel, None, x) if second_rounding and bias is not None else None
    mag = reference(spec, np.abs(kernel), None if bias is None else np.abs(bias), np.abs(x))
    fan_in = int(np.prod(spec.kernel_shape)) // spec.out_channels * spec.groups
    return compare(y, exact, mag, dtype=dtype, fan_in=fan_in, accumulate=accumulate,
                   exact_without_bias=before_bias).max_error_ratio


ACCUMULATION = {
    "conv-float16": (ec.spec("tf:conv", channels=32, spatial=(6, 6), kernel_size=(3, 3), units=8, bias=False), "float16", "float32"),
    "conv-bfloat16": (ec.spec("tf:conv", channels=32, spatial=(6, 6), kernel_size=(3, 3), units=8, bias=False), "bfloat16", "float32"),
    "depthwise-float16": (ec.spec("tf:depthwise", channels=16, spatial=(12, 12), kernel_size=(7, 7), bias=False), "float16", "float16"),
    "transposed-float16": (ec.spec("tf:conv_transpose", channels=32, spatial=(4, 4), kernel_size=(3, 3), units=8, stride=2,
                                   bias=False), "float16", "float16"),
    "conv3d-float16": (ec.spec("tf:conv", channels=32, spatial=(4, 4, 4), kernel_size=(3, 3, 3), units=8, bias=False),
                       "float16", "float16"),
}


@pytest.mark.parametrize("case", ACCUMULATION)
def test_low_precision_accumulation(tf, case):
    spec, dtype, acc = ACCUMULATION[case]
    assert backends.get("tf").accumulate(dtype, spec) == acc, "the tf backend's accumulate() disagrees with the fact"
    assert _ratio(spec, dtype, acc) <= 1, f"fact: TF CPU {case} stays within the bound of {acc} accumulation"
    if acc != "float32":
        assert _ratio(spec, dtype, "float32") > 1, f"fact: TF CPU {case} does not fit float32 accumulation: it sums in {acc}"


def test_bias_add_rounds_a_second_time(tf):
    spec = ec.spec("tf:conv", channels=32, spatial=(6, 6), kernel_size=(3, 3), units=8)
    assert backends.get("tf").accumulate("bfloat16", spec) == "float32"
    assert _ratio(spec, "bfloat16", "float32") <= 1, "the bound with the bias add as a second rounding holds"
    assert _ratio(spec, "bfloat16", "float32", second_rounding=False) > 1, (
        "fact: tf.nn.bias_add adds the bias to the already rounded bfloat16 conv output (two roundings)"
    )


def test_depthwise_with_stride_and_dilation_is_not_the_spec(tf):
    spec = ec.spec("tf:depthwise", channels=2, spatial=(9, 8), kernel_size=(3, 2), stride=2, dilation=2, bias=False)
    assert backends.get("tf").unsupported(spec, "float32"), "the tf backend should refuse it"
    kernel, _, x = random_weights(spec)
    with pytest.warns(UserWarning, match="strides must be 1"):
        y = tf.nn.depthwise_conv2d(x, kernel, [1, 2, 2, 1], "VALID", dilations=(2, 2)).numpy()
    assert y.shape[1:] != spec.output_shape, "fact: depthwise_conv2d with strides and dilations > 1 is not that layer"


def test_eigen_conv3d_same_padding_is_wrong_when_a_stride_makes_it_negative(tf):
    spec = ec.spec("tf:conv", channels=1, spatial=(5, 6, 6), kernel_size=(1, 1, 2), units=2, stride=(2, 3, 2),
                   padding="same", bias=False)
    kernel, _, x = random_weights(spec, dtype="float64")
    exact = reference(spec, kernel, None, x)
    for dtype, right in (("float64", False), ("float32", True)):
        y = tf.nn.conv3d(tf.cast(x, dtype), tf.cast(kernel, dtype), [1, 2, 3, 2, 1], "SAME").numpy()
        assert bool(np.abs(y - exact).max() < 1e-3) is right, f"fact: tf.nn.conv3d(padding='SAME') in {dtype} is {'right' if right else 'wrong'} here"
    layer = backends.get("tf").build(spec, "float64")
    layer.set_weights(kernel, None)
    np.testing.assert_allclose(layer(x), exact, rtol=1e-9, atol=1e-9, err_msg="the tf backend pads explicitly, so it is right")

"""The mutation check: every plausible wrong conversion is rejected, or marked — never passed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import equivcheck as ec
from equivcheck import strategies as es
from equivcheck.mutations import mutants
from equivcheck.verification import verify_pair

SHAPE = dict(channels=3, spatial=(2, 4), units=2)


def _names(source, target):
    return {m.name for m in mutants(source, target)}


def _verify(source, target, *, dtype="float32", seed=0, x=None):
    rng = np.random.default_rng(seed)
    kernel, bias = es.sample_weights(source, dtype, rng)
    x = es.sample_inputs(source, None, dtype, rng) if x is None else x
    return verify_pair(source, target, dtype=dtype, seed=seed, data=(kernel, bias, x))


def test_catalogue_names_the_plausible_mistakes():
    dense_to_conv = _names(ec.spec("keras:dense", **SHAPE), ec.spec("theano:conv", **SHAPE))
    assert {"missing flip", "flip H only", "flip W only", "kernel axes permuted", "channels permuted",
            "reshape only", "wrong flatten order", "dense kernel not transposed"} <= dense_to_conv
    conv_to_dense = _names(ec.spec("theano:conv", **SHAPE), ec.spec("torch:dense", **SHAPE))
    assert {"missing flip", "flip H only", "flip W only", "wrong flatten order", "dense kernel not transposed"} <= conv_to_dense
    same = _names(ec.spec("torch:dense", **SHAPE), ec.spec("torch:conv", **SHAPE))
    assert "spurious flip" in same and "reshape only" not in same  # a plain reshape is right there
    dense_dense = _names(ec.spec("keras:dense", **SHAPE), ec.spec("flax:dense", **SHAPE))
    assert {"wrong flatten order (source)", "wrong flatten order (target)"} <= dense_dense


def test_mutants_are_distinct_wrong_mappings():
    src, dst = ec.spec("keras:dense", **SHAPE), ec.spec("theano:conv", **SHAPE)
    right = ec.plan(src, dst)
    found = mutants(src, dst)
    probe = np.arange(np.prod(src.kernel_shape)).reshape(src.kernel_shape)
    outs = [m.mapping.apply(probe) for m in found]
    assert all(o.shape == dst.kernel_shape for o in outs)
    assert not any(np.array_equal(o, right.apply(probe)) for o in outs)
    assert len({o.tobytes() for o in outs}) == len(outs)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("keras:dense", "theano:conv"),
        ("theano:conv", "torch:dense"),
        ("keras:conv", "torch:conv"),
        ("keras_cf:dense", "tflite:conv"),
        ("jax:dense", "keras:dense"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_mutant_is_rejected_on_the_designed_data(source, target, dtype):
    src, dst = ec.spec(source, **SHAPE), ec.spec(target, **SHAPE)
    case = _verify(src, dst, dtype=dtype)
    assert case.verdict == "pass", case.reason
    assert case.mutations and all(m.outcome == "rejected" for m in case.mutations), case.mutations


def test_mutants_on_one_wide_axes_are_ambiguous_not_passed():
    shape = dict(channels=3, spatial=(1, 4), units=2)
    src, dst = ec.spec("keras:dense", **shape), ec.spec("torch:conv", **shape)
    marked = {m.name: m.ambiguous for m in mutants(src, dst)}
    assert marked["flip H only"] and marked["kernel axes permuted"]
    assert not marked["spurious flip"]  # with H 1-wide, "flip W only" is the same mistake: listed once
    case = _verify(src, dst)
    outcomes = {m.name: m.outcome for m in case.mutations}
    assert outcomes["flip H only"] == "ambiguous" and outcomes["kernel axes permuted"] == "ambiguous"
    assert outcomes["spurious flip"] == "rejected" and "flip W only" not in outcomes
    # One channel: the flatten order cannot matter.
    one = dict(channels=1, spatial=(2, 2), units=2)
    flat = {m.name: m.ambiguous for m in mutants(ec.spec("keras:dense", **one), ec.spec("torch:dense", **one))}
    assert flat["wrong flatten order (source)"]


def test_data_that_cannot_reject_a_mutant_makes_the_case_inconclusive():
    """A constant input cannot see a flip: the case is inconclusive, never a pass."""
    src, dst = ec.spec("onnx:dense", **SHAPE), ec.spec("theano:conv", **SHAPE)
    x = np.ones((4, 3, 2, 4), dtype=np.float32)
    case = _verify(src, dst, x=x)
    assert case.verdict == "inconclusive"
    missed = {m.name for m in case.mutations if m.outcome == "not rejected"}
    assert "missing flip" in missed and "missing flip" in case.reason


@settings(max_examples=15, deadline=None)
@given(pair=es.spec_pairs(presets=["onnx", "caffe", "tflite", "flax"]), dtype=es.dtypes(names=["float32", "bfloat16"]))
def test_generated_cases_reject_every_mutant(pair, dtype):
    source, target = pair
    case = _verify(source, target, dtype=dtype)
    assert case.verdict == "pass", case.reason
    assert all(m.outcome == "rejected" for m in case.mutations), [(m.name, m.outcome) for m in case.mutations]


def test_a_failed_conversion_is_diagnosed_from_its_kernel_on_any_data():
    """The diagnosis compares the converted kernel with each mutant: no re-run, so the caller's data and a
    kernel of any size (here 300k weights) get one too."""
    src = ec.spec("theano:dense", channels=48, spatial=(5, 5), units=250)
    dst = ec.spec("theano:conv", channels=48, spatial=(5, 5), units=250)
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal(src.kernel_shape).astype(np.float32)
    bias = rng.standard_normal(250).astype(np.float32)
    x = rng.standard_normal((3, 48, 5, 5)).astype(np.float32)

    def no_flip(k, b):
        return k.T.reshape(250, 48, 5, 5), b

    case = verify_pair(src, dst, converter=no_flip, data=(kernel, bias, x), mutants=False)
    assert case.verdict == "fail"
    assert case.diagnosis == {"mutant": "missing flip", "convention": "flip",
                              "description": "kernel flipped 180° in space relative to the right conversion",
                              "code": "w.T.reshape(250, 48, 5, 5)",
                              "right": "w.T.reshape(250, 48, 5, 5)[:, :, ::-1, ::-1]"}
    assert case.to_dict()["diagnosis"]["mutant"] == "missing flip"

    def no_flip_and_bias_lost(k, b):
        return k.T.reshape(250, 48, 5, 5), np.zeros_like(b)

    case = verify_pair(src, dst, converter=no_flip_and_bias_lost, data=(kernel, bias, x), mutants=False)
    assert case.verdict == "fail" and case.diagnosis is None  # two mistakes: not exactly the mutant
    assert "diagnosis" not in case.to_dict()


# -- depthwise channel order, padding side, transposed in/out, bias order ------------------
DEPTHWISE = dict(channels=3, spatial=(6, 5), kernel_size=(3, 3), multiplier=2)


def _depthwise_order_oracle(kernel_hwcm: np.ndarray) -> np.ndarray:
    """Keras (h, w, C, M) read as torch's (C*M, 1, h, w) with channel m*C + c instead of c*M + m: index arithmetic."""
    h, w, c, m = kernel_hwcm.shape
    out = np.empty((c * m, 1, h, w), kernel_hwcm.dtype)
    for ci in range(c):
        for mi in range(m):
            out[mi * c + ci, 0] = kernel_hwcm[:, :, ci, mi]
    return out


def test_depthwise_channel_order_mutant_reads_m_times_c_plus_c():
    src, dst = ec.spec("keras:depthwise", **DEPTHWISE), ec.spec("torch:depthwise", **DEPTHWISE)
    by_name = {m.name: m for m in mutants(src, dst)}
    wrong = by_name["depthwise channel order"]
    assert str(wrong.convention) == "channel order" and not wrong.ambiguous
    k = np.arange(np.prod(src.kernel_shape), dtype=np.float32).reshape(src.kernel_shape)
    np.testing.assert_array_equal(wrong.mapping.apply(k), _depthwise_order_oracle(k))
    assert "bias in the other channel order" in by_name
    no_mult = {m.name for m in mutants(ec.spec("keras:depthwise", **{**DEPTHWISE, "multiplier": 1}),
                                       ec.spec("torch:depthwise", **{**DEPTHWISE, "multiplier": 1}))}
    assert "depthwise channel order" not in no_mult, "with M = 1 both orders are the same"


@pytest.mark.parametrize("pair", [("keras:depthwise", "torch:depthwise"), ("torch:depthwise", "keras:depthwise"),
                                  ("tflite:depthwise", "keras:depthwise")])
def test_new_mutants_are_rejected_on_verify_data(pair):
    case = verify_pair(ec.spec(pair[0], **DEPTHWISE), ec.spec(pair[1], **DEPTHWISE))
    outcomes = {m.name: m.outcome for m in case.mutations}
    assert case.verdict == "pass", case.reason
    assert outcomes["depthwise channel order"] == outcomes["bias in the other channel order"] == "rejected"


def test_same_padding_at_stride_2_has_a_mirrored_padding_mutant_that_is_rejected():
    shape = dict(channels=3, spatial=(8, 6), kernel_size=(3, 3), units=4, stride=2, padding="same")
    src, dst = ec.spec("keras:conv", **shape), ec.spec("torch:conv", **shape)
    assert dst.pads() == ((0, 1), (0, 1)), "TF 'same' at stride 2 on an even map pads after"
    padding = next(m for m in mutants(src, dst) if str(m.convention) == "padding")
    assert padding.target.pads() == ((1, 0), (1, 0)) and padding.target.output_shape == dst.output_shape
    case = verify_pair(src, dst)
    assert {m.name: m.outcome for m in case.mutations}[padding.name] == "rejected"
    symmetric = ec.spec("torch:conv", **{**shape, "stride": 1})
    assert not any(str(m.convention) == "padding" for m in mutants(symmetric, symmetric)), "nothing to mirror"


def test_transposed_conv_in_out_swap_is_named():
    shape = dict(channels=4, spatial=(3, 3), kernel_size=(2, 2), units=6, stride=2)
    found = {m.name: m for m in mutants(ec.spec("keras:conv_transpose", **shape), ec.spec("torch:conv_transpose", **shape))}
    swap = found["transposed in/out swapped"]
    assert str(swap.convention) == "channels" and not swap.ambiguous


def test_a_converter_that_leaves_the_bias_in_the_other_order_is_diagnosed_as_a_bias_mistake():
    src, dst = ec.spec("keras:depthwise", **DEPTHWISE), ec.spec("torch:depthwise", **DEPTHWISE)
    c, m = 3, 2

    def convert(kernel, bias):
        right, _ = ec.convert(src, dst, kernel, bias)
        return right, bias.reshape(c, m).T.reshape(-1)  # the kernel right; bias channel c*M + m moved to m*C + c

    case = verify_pair(src, dst, converter=convert)
    assert case.verdict == "fail"
    assert case.diagnosis["convention"] == "bias" and case.diagnosis["mutant"] == "bias in the other channel order"

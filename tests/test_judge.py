"""The judge: data from the probed facts, mutants proven on the reference, one identification."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.backends.probe import Facts
from equivcheck.data import LOW_PRECISION_NONZEROS, NONZEROS
from equivcheck.judge import draw_data, judge_pair
from equivcheck.mutations import mutants

PAIRS = [
    ("keras:dense", "torch:conv", dict(channels=3, spatial=(4, 5), units=4)),
    ("theano:dense", "theano:conv", dict(channels=2, spatial=(3, 3), units=3)),
    ("torch:conv", "keras:conv", dict(channels=4, spatial=(6, 6), units=3, kernel_size=(3, 3))),
    ("torch:depthwise", "keras:depthwise", dict(channels=3, spatial=(5, 5), multiplier=2, kernel_size=(3, 3))),
    ("torch:conv_transpose", "keras:conv_transpose", dict(channels=3, spatial=(3, 3), units=2, kernel_size=(3, 3),
                                                         stride=2)),
    ("torch:conv", "torch:conv", dict(channels=4, spatial=(6, 6), units=4, kernel_size=(3, 3), groups=2)),
]


def _facts(accumulate: str) -> dict[str, Facts]:
    return {role: Facts("numpy", "float16", "layer", True, accumulate=accumulate) for role in ("source", "target")}


def test_data_are_sparser_where_a_backend_sums_below_float32():
    src = ec.spec("keras:conv", channels=64, spatial=(6, 6), units=4, kernel_size=(3, 3))
    dense_x = draw_data(src, src, "float16", _facts("float32"), seed=0)[2]
    sparse_x = draw_data(src, src, "float16", _facts("float16"), seed=0)[2]
    per_sample = lambda x: np.count_nonzero(x.reshape(len(x), -1), axis=1).max()  # noqa: E731
    assert NONZEROS >= 64 * 9 and per_sample(dense_x) == dense_x[0].size  # a receptive field fits: all non-zero
    assert per_sample(sparse_x) < per_sample(dense_x) and len(sparse_x) > len(dense_x)
    assert per_sample(sparse_x) >= LOW_PRECISION_NONZEROS
    covered = np.count_nonzero(sparse_x, axis=0)  # every input position still exercised
    assert covered.min() >= 1


@pytest.mark.parametrize(("source", "target", "shape"), PAIRS, ids=lambda v: v if isinstance(v, str) else "")
def test_a_rejected_mutant_fails_on_the_real_layer(source, target, shape):
    """The float64 proof: a mutant judged 'rejected' gives a failing case when a converter makes exactly it."""
    src, dst = ec.spec(source, **shape), ec.spec(target, **shape)
    case = judge_pair(src, dst, source_backend="numpy", target_backend="numpy", seed=3)
    assert case.verdict == "pass", case.reason
    by_name = {m.name: m for m in mutants(src, dst, case.mapping)}
    rejected = [o for o in case.mutations if o.outcome == "rejected" and by_name[o.name].target is None]
    assert rejected, "no mutant was rejected"
    for outcome in rejected:
        mutant = by_name[outcome.name]

        def wrong(kernel, bias, mutant=mutant):
            b = bias if mutant.bias is None or bias is None else mutant.bias.apply(bias)
            return mutant.mapping.apply(kernel), b

        failed = judge_pair(src, dst, source_backend="numpy", target_backend="numpy", seed=3, converter=wrong,
                            mutants=False)
        assert failed.verdict == "fail", f"{outcome.name} was proven rejected but passes: {failed.reason}"
        assert outcome.max_error_ratio > 1


def test_a_failure_is_identified_once_and_named():
    src = ec.spec("theano:dense", channels=2, spatial=(3, 3), units=3)
    dst = ec.spec("theano:conv", channels=2, spatial=(3, 3), units=3)

    def no_flip(kernel, bias):  # forgets that Theano's conv flips its kernel
        return kernel.T.reshape(3, 2, 3, 3), bias

    case = judge_pair(src, dst, converter=no_flip)
    assert case.verdict == "fail"
    assert case.identification is not None and "flip" in case.identification.summary()
    assert case.diagnosis == case.identification.diagnosis()
    calls = []
    given = judge_pair(src, dst, converter=no_flip, identify_with=lambda: calls.append(1) or case.identification)
    assert calls == [1] and given.identification is case.identification


def test_the_checker_judges_through_the_judge_with_the_facts_data():
    """check_converter and verify_pair see the same data for the same seed: one path."""
    src = ec.spec("keras:dense", channels=3, spatial=(4, 5), units=4)
    dst = ec.spec("torch:conv", channels=3, spatial=(4, 5), units=4)
    from equivcheck.checker import check_conversion

    via_checker = check_conversion(lambda k, b: ec.convert(src, dst, k, b), src, dst, seed=11)
    direct = ec.verify_pair(src, dst, seed=11)
    assert via_checker.comparison == direct.comparison
    assert [m.outcome for m in via_checker.mutations] == [m.outcome for m in direct.mutations]


@pytest.mark.parametrize(("source", "target", "shape"), [
    *PAIRS[:3], ("keras:dense", "keras:conv", dict(channels=3, spatial=(3, 4), units=5)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_stacked_mutants_are_judged_as_one_at_a_time(source, target, shape):
    """The stacked judgement (one forward, one pass over all mutants) gives each mutant the ratio that judging it
    alone on the target's own layer gives."""
    from equivcheck.judge import Reference, pair_facts
    from equivcheck.specs import fan_in

    src, dst = ec.spec(source, **shape), ec.spec(target, **shape)
    facts, _ = pair_facts(src, dst, "numpy", "numpy", "float32")
    kernel, bias, x = draw_data(src, dst, "float32", facts, seed=5)
    case = judge_pair(src, dst, seed=5, data=(kernel, bias, x))
    fan = max(1, min(fan_in(src), int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max())))
    tgt = Reference.probed(dst, src, x, facts["target"], dtype="float32", fan=fan)
    exact, mag, nb = Reference.probed(src, dst, x, facts["source"], dtype="float32", fan=fan).outputs(kernel, bias)
    bound = tgt.bound(exact, mag, nb)
    by_name = {m.name: m for m in mutants(src, dst, case.mapping)}
    checked = 0
    for outcome in case.mutations:
        mutant = by_name[outcome.name]
        if outcome.outcome == "ambiguous" or mutant.target is not None:
            continue
        b = bias if mutant.bias is None or bias is None else mutant.bias.apply(bias)
        y, m_mag, m_nb = tgt.outputs(mutant.mapping.apply(kernel), b if dst.bias else None)
        alone = float(np.max(np.abs(y - exact) / (bound + tgt.bound(y, m_mag, m_nb))))
        assert outcome.max_error_ratio == pytest.approx(alone, rel=1e-9), outcome.name
        assert outcome.outcome == ("rejected" if alone > 1 else "not rejected")
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize(("source", "target"), [("keras:dense", "torch:conv"), ("torch:dense", "keras:conv"),
                                                ("torch:conv", "keras:conv")])
def test_the_lean_reference_reads_a_covering_kernel_in_blocks(source, target, monkeypatch):
    """``Reference.outputs(stored=...)``: a kernel covering the map is read block by block from the stored array
    (explore's fc6 check), never through a full-size forward, and gives the full reference's outputs."""
    from equivcheck import judge
    from equivcheck.planning import plan

    shape = dict(channels=3, spatial=(3, 4), units=5)
    conv = dict(shape, kernel_size=(3, 4))
    src, dst = ec.spec(source, **(conv if "conv" in source else shape)), ec.spec(target, **conv)
    assert dst.covers_map
    rng = np.random.default_rng(0)
    stored = rng.standard_normal(src.kernel_shape).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    m = plan(src, dst)
    full = judge.Reference(dst, dst, x, dtype="float32", fan=36).outputs(m.apply(stored), bias)
    monkeypatch.setattr(judge, "CHUNK_WEIGHTS", 2 * 36)  # two output channels per block: three blocks
    monkeypatch.setattr(judge, "reference_forward", lambda *a: pytest.fail("a full-size forward was run"))
    lean = judge.Reference(dst, dst, x, dtype="float32", fan=36).outputs(stored, bias, stored=m)
    for a, b in zip(full, lean):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    assert not np.array_equal(lean[0], lean[2])  # the bias was added after the sum kept as `exact before the bias`

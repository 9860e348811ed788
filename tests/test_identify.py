"""The one convention identifier: exact comparisons of weights, no forward pass."""

from __future__ import annotations

import numpy as np

import equivcheck as ec
from equivcheck.identification import identify, probe_weights
from equivcheck.mutations import mutants

SRC = ec.spec("keras:dense", channels=3, spatial=(2, 4), units=5)
DST = ec.spec("torch:conv", channels=3, spatial=(2, 4), units=5)


def test_the_right_kernel_is_exact_and_names_the_presets_it_is_also_right_for():
    k, b = probe_weights(SRC)
    found = identify(SRC, DST, ec.plan(SRC, DST).apply(k), b)
    assert found.exact and not found.mistakes and "onnx:conv" in found.same_as
    assert found.summary().startswith("matches torch:conv")
    assert found.diagnosis() is None


def test_each_rejectable_mutant_is_named_with_its_convention_and_the_right_code():
    k, b = probe_weights(SRC)
    for m in mutants(SRC, DST):
        if m.ambiguous or m.target is not None:
            continue
        kernel = m.mapping.apply(k)
        bias = b if m.bias is None else m.bias.apply(b)
        found = identify(SRC, DST, kernel, bias)
        assert found.differences == (m.name,), (m.name, found.summary())
        diagnosis = found.diagnosis()
        assert diagnosis["convention"] == str(m.convention)
        assert diagnosis["right"] == ec.plan(SRC, DST).simplify().code("numpy")


def test_a_bias_in_the_other_channel_order_is_a_bias_mistake_the_kernel_being_right():
    shape = dict(channels=3, spatial=(5, 5), kernel_size=(3, 3), multiplier=2)
    src, dst = ec.spec("keras:depthwise", **shape), ec.spec("torch:depthwise", **shape)
    k, b = probe_weights(src)
    wrong_bias = b.reshape(3, 2).T.reshape(-1)
    found = identify(src, dst, ec.plan(src, dst).apply(k), wrong_bias)
    assert not found.exact and found.diagnosis()["convention"] == "bias"


def test_a_kernel_mistake_with_a_wrong_bias_too_is_not_one_diagnosis():
    k, b = probe_weights(SRC)
    flip = next(m for m in mutants(SRC, DST) if m.name == "wrong flatten order")
    found = identify(SRC, DST, flip.mapping.apply(k), np.zeros_like(b))
    assert found.differences == ("wrong flatten order",) and found.problem == "the bias differs too"
    assert found.diagnosis() is None and "bias differs" in found.summary()


def test_changed_values_and_wrong_shapes_are_said_not_guessed():
    k, b = probe_weights(SRC)
    right = ec.plan(SRC, DST).apply(k)
    assert "changes weight values" in identify(SRC, DST, 2 * right, b).summary()
    assert "expects" in identify(SRC, DST, right.reshape(-1), b).summary()


def test_the_checker_and_verify_use_it():
    from equivcheck.checker import identify_conventions

    flip = next(m for m in mutants(SRC, DST) if m.name == "wrong flatten order")
    assert identify_conventions(lambda k, b: (flip.mapping.apply(k), b), SRC, DST).differences == ("wrong flatten order",)
    case = ec.verify_pair(SRC, DST, converter=lambda k, b: (flip.mapping.apply(k), b), mutants=False)
    assert case.verdict == "fail" and case.diagnosis["mutant"] == "wrong flatten order"

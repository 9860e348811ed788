"""The project's own conversions, checked through its own pytest plugin (the ``equivcheck`` fixture).

These run on the real frameworks named by the presets (keras, torch, scipy), so the planner's
one-liners are verified the way a user's converter would be. Each test then checks that every
case really ran on the framework its preset names: a side that the checker quietly ran on the
numpy reference instead (the framework missing from its table, not allowed, or probed as unable)
fails the test, unless running that framework's layer directly here fails too; and a check the
fixture skipped is accepted only on the same condition.
"""

import numpy as np
import pytest

import equivcheck as ec

from .backends._support import MODULES, fails_for_real

#: The framework each preset names, written here (not read from equivcheck's own table); caffe has
#: no runnable framework, so the reference is its runner.
FRAMEWORK = {"keras": "keras", "keras_cf": "keras", "tf": "tf", "torch": "torch", "jax": "jax", "flax": "jax",
             "scipy": "scipy", "theano": "scipy", "onnx": "onnxruntime", "tflite": "tflite", "caffe": "numpy"}


class RanOnReference(AssertionError):
    """A case ran a side on the numpy reference although its preset's framework runs that layer here."""


def require(*frameworks: str) -> None:
    for name in frameworks:
        for module in MODULES[name]:
            pytest.importorskip(module, reason=f"{module} is not installed: pip install 'equivcheck[{name}]'")


def unrunnable_sides(records) -> list[str]:
    """Sides of the checked cases that did not run on their preset's framework, each verified to fail
    when that framework's layer is built and run directly here; any other fallback raises.

    A skipped case is accepted only where one of its layers fails when run directly (as
    ``tests/backends/_support.py::assert_verdict`` does).
    """
    assert records, "nothing was checked"
    cannot = []
    for record in records:
        case = record.case
        sides = [(spec, backend, FRAMEWORK[spec.name.split(":")[0]])
                 for spec, backend in ((case.source, case.source_backend), (case.target, case.target_backend))]
        if case.verdict == "skip":
            failures = [f"{spec.name} on {named}: {why}" for spec, _, named in sides
                        if (why := fails_for_real(named, spec, case.dtype))]
            if not failures:
                raise RanOnReference(f"{case.title()} skipped ({case.reason}), but both layers run right here "
                                     "when built directly")
            cannot += failures
            continue
        for spec, backend, named in sides:
            if backend == named:
                continue
            why = fails_for_real(named, spec, case.dtype)
            if not why:
                raise RanOnReference(
                    f"{spec.describe()} ran on {backend} instead of {named} (notes: {record.notes or '-'}), "
                    f"but {named} runs it right here when built directly")
            cannot.append(f"{spec.name} on {named}: {why}")
    return cannot


def on_named_frameworks(equivcheck, check, *, skip_if_unrunnable: bool = True):
    """``check()`` (a call on the fixture), then :func:`unrunnable_sides` over the cases it recorded.

    A fixture skip (every case skipped) is re-checked the same way before it is allowed through.
    """
    before = len(equivcheck.records)
    try:
        result = check()
    except pytest.skip.Exception:
        cannot = unrunnable_sides(equivcheck.records[before:])
        pytest.skip(f"cannot run here, checked directly: {'; '.join(cannot)}")
    cannot = unrunnable_sides(equivcheck.records[before:])
    if cannot and skip_if_unrunnable:
        pytest.skip(f"ran on numpy because, checked directly, these do not run here: {'; '.join(cannot)}")
    return result, cannot


def keras_dense_to_torch_conv(kernel, bias):
    """What a user writes after reading `equivcheck plan`: VGG-style fc6 made convolutional."""
    return kernel.reshape(5, 6, 8, 3).transpose(3, 2, 0, 1), bias


def theano_answer(kernel, bias):
    """The seed's legacy answer, at a small shape."""
    return kernel.T.reshape(3, 8, 5, 6)[:, :, ::-1, ::-1], bias


def test_keras_dense_to_torch_conv(equivcheck):
    require("torch", "keras")
    cases, _ = on_named_frameworks(equivcheck, lambda: equivcheck.check_converter(
        keras_dense_to_torch_conv, source="keras:dense", target="torch:conv", channels=8, spatial=(5, 6), units=3))
    assert [(c.source_backend, c.target_backend, c.verdict) for c in cases] == [("keras", "torch", "pass")]


def test_theano_one_liner(equivcheck):
    require("scipy")
    cases, _ = on_named_frameworks(equivcheck, lambda: equivcheck.check_converter(
        theano_answer, source="theano:dense", target="theano:conv", channels=8, spatial=(5, 6), units=3))
    assert [(c.source_backend, c.target_backend, c.verdict) for c in cases] == [("scipy", "scipy", "pass")]


def test_a_missing_flip_is_caught_and_named(equivcheck):
    require("scipy")

    def forgot_flip(kernel, bias):
        return kernel.T.reshape(3, 8, 5, 6), bias

    def check():
        with pytest.raises(AssertionError, match="flip"):
            equivcheck.check_converter(forgot_flip, source="theano:dense", target="theano:conv",
                                       channels=8, spatial=(5, 6), units=3)

    on_named_frameworks(equivcheck, check)
    case = equivcheck.records[-1].case
    assert (case.source_backend, case.target_backend, case.verdict) == ("scipy", "scipy", "fail")


def planned(source, target, kernel, bias):
    return ec.convert(source, target, np.asarray(kernel), bias)


@pytest.mark.equivcheck(kinds=["dense->conv", "conv->dense", "conv->conv"], presets=["keras", "torch", "onnx", "tflite"],
                        max_examples=8)
def test_planner_on_generated_pairs(equivcheck):
    require("torch", "keras", "onnxruntime", "tflite")
    cases, cannot = on_named_frameworks(equivcheck, lambda: equivcheck.check_pairs(planned), skip_if_unrunnable=False)
    assert cases and all(c.verdict == "pass" for c in cases), [(c.title(), c.verdict, c.reason) for c in cases]
    assert len(cannot) < 2 * len(cases), f"no generated pair ran a layer on its named framework: {cannot}"

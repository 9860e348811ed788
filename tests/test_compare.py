"""The comparator: its bound, its verdicts and reduced-precision detection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equivcheck.compare import (
    ACCUMULATION_FACTOR,
    accumulation_dtype,
    compare,
    error_bound,
    reduced_precision_matmul,
    unit_roundoff,
)
from equivcheck.errors import SpecError, VerificationError


def _outputs(shape=(4, 3), seed=0):
    rng = np.random.default_rng(seed)
    exact = rng.standard_normal(shape)
    return exact, np.abs(exact) + 1.0


def test_exact_output_passes_and_reports_zero_error():
    exact, mag = _outputs()
    r = compare(exact.copy(), exact, mag, dtype="float32", fan_in=10)
    assert r.passed and r.max_abs_error == 0 and r.fraction_out_of_bound == 0 and r.nonfinite == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_error_at_the_bound_passes_and_just_over_fails(dtype):
    exact, mag = _outputs()
    bound = error_bound(exact, mag, dtype=dtype, fan_in=100)
    assert compare(exact + 0.999 * bound, exact, mag, dtype=dtype, fan_in=100).passed
    worse = exact.copy()
    worse[2, 1] += 1.01 * bound[2, 1]
    r = compare(worse, exact, mag, dtype=dtype, fan_in=100)
    assert not r.passed
    assert r.worst_index == (2, 1)
    assert r.fraction_out_of_bound == pytest.approx(1 / exact.size)
    assert r.max_error_ratio == pytest.approx(1.01)
    assert r.max_abs_error == pytest.approx(1.01 * bound[2, 1])


def test_bound_formula_terms():
    exact, mag = np.array([2.0]), np.array([3.0])
    b = error_bound(exact, mag, dtype="bfloat16", fan_in=49, exact_without_bias=np.array([0.5]))
    expected = 2.0**-8 * (2.0 + 0.5) + ACCUMULATION_FACTOR * 7 * 2.0**-24 * 3.0
    assert b[0] == pytest.approx(expected, rel=1e-9)
    # Without the bias-free output the bound assumes one rounding of the same value, twice.
    assert error_bound(exact, mag, dtype="bfloat16", fan_in=49)[0] == pytest.approx(
        2.0**-8 * 4.0 + ACCUMULATION_FACTOR * 7 * 2.0**-24 * 3.0, rel=1e-9)
    # TF32 products: each product's input rounding adds 2·u_tf32·|W|·|x|, without √n.
    t = error_bound(exact, mag, dtype="float32", fan_in=49, accumulate="tf32")
    assert t[0] == pytest.approx(2.0**-24 * 4.0 + (2 * 2.0**-11 + ACCUMULATION_FACTOR * 7 * 2.0**-24) * 3.0, rel=1e-9)


def test_bound_grows_with_fan_in_and_low_precision_accumulation():
    exact, mag = _outputs()
    small = error_bound(exact, mag, dtype="float16", fan_in=9)
    large = error_bound(exact, mag, dtype="float16", fan_in=25088)
    low = error_bound(exact, mag, dtype="float16", fan_in=25088, accumulate="float16")
    assert np.all(small < large) and np.all(large < low)


def test_bound_floor_covers_rounding_near_zero():
    zero = np.zeros(3)
    assert np.all(error_bound(zero, zero, dtype="float16", fan_in=1) >= 2.0**-24)
    assert compare(np.full(3, 2.0**-25), zero, zero, dtype="float16", fan_in=1).passed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_never_passes_even_with_a_huge_bound(bad):
    exact, mag = _outputs()
    actual = exact.copy()
    actual[0, 0] = bad
    r = compare(actual, exact, mag * 1e300, dtype="bfloat16", fan_in=1)
    assert not r.passed and r.nonfinite == 1 and "NaN/Inf" in r.summary()
    d = r.to_dict()
    assert d["max_abs_error"] is None  # JSON-safe


def test_nan_in_the_expected_result_never_passes():
    exact, mag = _outputs()
    expected = exact.copy()
    expected[1, 1] = np.nan
    assert not compare(exact, expected, mag, dtype="float32", fan_in=4).passed


def test_relative_error_and_summary():
    exact = np.array([[1.0, -2.0]])
    r = compare(exact * (1 + 1e-3), exact, np.abs(exact), dtype="float32", fan_in=2)
    assert r.max_rel_error == pytest.approx(1e-3)
    assert "out of bound" in r.summary() and not r.passed


def test_shape_mismatch_and_unknown_dtype_are_errors():
    exact, mag = _outputs()
    with pytest.raises(VerificationError, match="shape"):
        compare(exact[:2], exact, mag, dtype="float32", fan_in=1)
    with pytest.raises(SpecError, match="dtype='float8'"):
        unit_roundoff("float8")
    with pytest.raises(SpecError):
        compare(exact, exact, mag, dtype="int8", fan_in=1)


def test_accumulation_dtype():
    assert accumulation_dtype("float64") == "float64"
    assert accumulation_dtype("bfloat16") == "float32"
    assert accumulation_dtype("float32", tf32=True) == "tf32"
    assert accumulation_dtype("float16", tf32=True) == "float32"


def test_empty_output_passes():
    e = np.zeros((0, 3))
    assert compare(e, e, e, dtype="float32", fan_in=3).passed


def test_torch_reduced_precision_matmul_is_detected_and_recorded():
    torch = pytest.importorskip("torch", reason="TF32 detection reads torch's settings")
    exact, mag = _outputs()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert "torch" not in reduced_precision_matmul()
        assert compare(exact, exact, mag, dtype="float32", fan_in=9).accumulate == "float32"
        torch.set_float32_matmul_precision("high")
        assert reduced_precision_matmul()["torch"] == "tf32"
        r = compare(exact, exact, mag, dtype="float32", fan_in=9, accumulate="float32")
        assert r.accumulate == "tf32" and "torch: tf32" in r.reduced_precision
        # Reduced float32 matmul does not touch half-precision checks.
        assert compare(exact, exact, mag, dtype="bfloat16", fan_in=9).accumulate == "float32"
        torch.set_float32_matmul_precision("medium")
        assert compare(exact, exact, mag, dtype="float32", fan_in=9).accumulate == "bf16x"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_real_torch_conv_correct_passes_and_swap_is_caught(dtype):
    """On a real torch conv (fan-in 3136): no false alarm over a few conversions, a swapped pair caught."""
    torch = pytest.importorskip("torch", reason="the comparator is measured on a real framework")
    import equivcheck as ec
    from equivcheck.strategies import sample_inputs, sample_weights

    src = ec.spec("keras:dense", channels=64, spatial=(7, 7), units=3)
    dst = ec.spec("torch:conv", channels=64, spatial=(7, 7), units=3)
    m = ec.plan(src, dst)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    caught = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        kernel, bias = sample_weights(src, dtype, rng)
        x = sample_inputs(src, None, dtype, rng)
        k = m.apply(kernel)
        x64, k64, b64 = (np.asarray(a, dtype=np.float64) for a in (x, k, bias))
        flat = k64.reshape(3, -1)
        exact_nb = x64.reshape(len(x), -1) @ flat.T
        mag = np.abs(x64.reshape(len(x), -1)) @ np.abs(flat).T + np.abs(b64)
        fan_in = int(np.count_nonzero(x64.reshape(len(x), -1), axis=1).max())

        def run(kernel64, x64=x64, b64=b64):
            y = torch.nn.functional.conv2d(torch.from_numpy(x64).to(tdt), torch.from_numpy(kernel64).to(tdt),
                                           torch.from_numpy(b64).to(tdt))
            return y.double().reshape(len(x64), -1).numpy()

        ok = compare(run(k64), exact_nb + b64, mag, dtype=dtype, fan_in=fan_in, exact_without_bias=exact_nb)
        assert ok.passed, ok.summary()
        swapped = k64.reshape(-1).copy()
        i, j = rng.choice(swapped.size, 2, replace=False)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        bad = compare(run(swapped.reshape(k64.shape)), exact_nb + b64, mag, dtype=dtype, fan_in=fan_in,
                      exact_without_bias=exact_nb)
        caught += not bad.passed
    assert caught >= 4
    assert math.isfinite(ok.max_error_ratio) and ok.max_error_ratio <= 1

"""The model check's judgement of one replayed layer: the compiled pass and numpy agree to the bit, and the
threaded ``|W|·|x|`` sums as the serial one does."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equivcheck.modelcheck import judge as mj


def _compiled():
    return pytest.importorskip("equivcheck._fastjudge", reason="the compiled judgement was not built (no C compiler)")


def _fields(c) -> tuple:
    """A comparison's fields, NaN read as equal to NaN."""
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in vars(c).values())


def _both(monkeypatch, actual, reference, mag, bias, **kw):
    compiled = mj.judge(actual, reference, mag, bias, **kw)
    monkeypatch.setenv("EQUIVCHECK_NO_FASTJUDGE", "1")
    plain = mj.judge(actual, reference, mag, bias, **kw)
    monkeypatch.delenv("EQUIVCHECK_NO_FASTJUDGE")
    return compiled, plain


@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(2, 3, 5, 7), (1, 40, 9), (3, 17), (4,), (2, 2, 3, 3, 3)]),
       channels_last=st.booleans(), bias=st.booleans(), wrong=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
       special=st.sampled_from(["", "zeros", "ties", "nan", "inf"]))
def test_the_compiled_pass_gives_numpys_bits(seed, shape, channels_last, bias, wrong, special):
    _compiled()
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape).astype(np.float32)
    mag = (np.abs(ref) * rng.uniform(1, 30, shape)).astype(np.float32)
    act = (ref + wrong * rng.standard_normal(shape) * (rng.random(shape) < 0.1)).astype(np.float32)
    if special == "zeros":
        ref.flat[::3] = 0
        act.flat[::6] = 0
    elif special == "ties":  # the same worst ratio at several places: the first one is reported
        ref[...], mag[...], act[...] = 1, 1, 1.5
    elif special in ("nan", "inf"):
        act.flat[len(act.flat) // 2] = np.nan if special == "nan" else np.inf
    if channels_last and len(shape) > 2:  # a channels-last output read as channels first: a strided view
        act = np.moveaxis(np.ascontiguousarray(np.moveaxis(act, 1, -1)), -1, 1)
    channels = shape[1] if len(shape) > 1 else shape[0]
    b = rng.standard_normal(2 * channels).astype(np.float32)[::2] if bias else None  # a strided view, as a user's may be
    with pytest.MonkeyPatch.context() as mp:
        compiled, plain = _both(mp, act, ref, mag, b, dtype="float32", fan=50)
    assert _fields(compiled) == _fields(plain)


def test_the_compiled_pass_refuses_what_it_cannot_read():
    fast = _compiled()
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="2-D float32"):
        fast.judge_float32(a.astype(np.float64), a, a, None, 1e-7, 1e-5, 0.0, 16)
    with pytest.raises(ValueError, match="one shape"):
        fast.judge_float32(a, a[:1], a, None, 1e-7, 1e-5, 0.0, 16)
    with pytest.raises(ValueError, match="one float32 per row"):
        fast.judge_float32(a, a, a, np.zeros(3, np.float32), 1e-7, 1e-5, 0.0, 16)


def test_a_threaded_dense_magnitude_sums_as_the_serial_one(monkeypatch):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((300, 20_000)).astype(np.float32)  # (out, in): chains of inputs, blocks of outputs
    x = np.abs(rng.standard_normal((3, 20_000))).astype(np.float32)
    monkeypatch.setattr(mj, "MAGNITUDE_THREADED", 1)
    monkeypatch.setattr(mj, "cores", lambda: 3)
    threaded = mj._dense_magnitude(kernel, False, x)
    monkeypatch.setattr(mj, "cores", lambda: 1)
    serial = mj._dense_magnitude(kernel, False, x)
    assert np.array_equal(threaded, serial)
    exact = x.astype(np.float64) @ np.abs(kernel.astype(np.float64)).T
    assert np.allclose(serial, exact, rtol=1e-4, atol=0)

"""scipy.signal conventions, pinned on the real functions; the scipy preset checked against them."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec

from ._support import random_weights, reference

signal = pytest.importorskip("scipy.signal", reason="scipy not installed: pip install 'equivcheck[scipy]'")


def test_convolve_flips_and_correlate_does_not():
    rng = np.random.default_rng(0)
    x, k = rng.standard_normal((6, 7)), rng.standard_normal((3, 2))
    conv = signal.convolve(x, k, mode="valid", method="direct")
    np.testing.assert_allclose(conv, signal.correlate(x, k[::-1, ::-1], mode="valid", method="direct"),
                               err_msg="fact: scipy.signal.convolve is correlation with the kernel flipped")
    assert not np.allclose(conv, signal.correlate(x, k, mode="valid", method="direct")), "fact: convolve != correlate"


def test_scipy_preset_is_true_convolution_per_channel_pair():
    spec = ec.spec("scipy:conv", channels=3, spatial=(5, 6), kernel_size=(3, 2), units=2, bias=False)
    assert (spec.op, spec.kernel_layout) == ("convolve", "OIHW"), "scipy preset: OIHW kernel, true convolution"
    kernel, _, x = random_weights(spec)
    y = np.stack([
        sum(signal.convolve(x[n, c], kernel[o, c], mode="valid", method="direct") for c in range(3))
        for n in range(2) for o in range(2)
    ]).reshape(2, 2, *spec.output_spatial)
    np.testing.assert_allclose(y, reference(spec, kernel, None, x), rtol=1e-5, atol=1e-5,
                               err_msg="fact: summing scipy.signal.convolve over input channels is scipy:conv")


@pytest.mark.parametrize(("dtype", "error", "match"), [("float16", ValueError, "Unsupported type"), ("bfloat16", TypeError, "dtype")])
def test_no_half_precision(dtype, error, match):
    from equivcheck import backends
    from equivcheck.backends import np_dtype

    a = np.ones((4, 4), np_dtype(dtype))
    with pytest.raises(error, match=match):
        signal.convolve(a, a[:2, :2], mode="valid", method="direct")
    assert backends.get("scipy").unsupported(ec.spec("scipy:conv", channels=1, spatial=(4, 4), units=1), dtype)

"""SciPy: ``scipy.signal.convolve`` per (output, input) channel pair, the legacy Theano way.

``scipy.signal.convolve`` computes true convolution (the kernel flipped), so a convolution
runs with the canonical cross-correlation kernel flipped in space, and a transposed one —
which *is* a true convolution of the stride-dilated input with the kernel — with the
canonical kernel as is. Stride subsamples the stride-1 result, dilation spreads the kernel
with zeros, padding is ``np.pad``. The dense layer is a numpy matmul. ``method="direct"``
throughout, so the sums are plain dot products; SciPy has no float16 or bfloat16 kernels.
"""

from __future__ import annotations

import itertools

import numpy as np

from equivcheck.backends.base import (
    ArrayLayer,
    Backend,
    check_input,
    kernel_layout_mapping,
    np_dtype,
)
from equivcheck.backends.numpy import dense_forward, from_channels_first, to_channels_first
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec


def dilate(kernel: np.ndarray, dilation: tuple[int, ...]) -> np.ndarray:
    """A kernel ``(…, *k)`` with ``d − 1`` zeros between its taps along each of the last axes."""
    r = len(dilation)
    if all(d == 1 for d in dilation):
        return kernel
    lead = kernel.shape[: kernel.ndim - r]
    size = [d * (k - 1) + 1 for k, d in zip(kernel.shape[-r:], dilation)]
    out = np.zeros((*lead, *size), dtype=kernel.dtype)
    out[(Ellipsis, *(slice(None, None, d) for d in dilation))] = kernel
    return out


class ScipyLayer(ArrayLayer):
    """``spec`` computed with ``scipy.signal.convolve`` channel pair by channel pair."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        import scipy.signal

        self._signal = scipy.signal

    def __call__(self, x: np.ndarray) -> np.ndarray:
        spec = self.spec
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(spec, x)
        if isinstance(spec, DenseSpec):
            return dense_forward(spec, self.kernel, self.bias, x)
        xc = to_channels_first(x, spec.data_format)
        y = self._transposed(xc) if spec.transposed else self._conv(xc)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *(1,) * spec.rank)
        return np.ascontiguousarray(from_channels_first(y, spec.data_format)).astype(x.dtype, copy=False)

    def _canonical(self) -> np.ndarray:
        spec = self.spec
        layout = ("IO" if spec.transposed else "OI") + spec.letters
        return dilate(kernel_layout_mapping(spec, layout).apply(self.kernel), spec.dilation)

    def _conv(self, xc: np.ndarray) -> np.ndarray:
        spec, convolve = self.spec, self._signal.convolve
        r, g = spec.rank, spec.groups
        k = np.flip(self._canonical(), axis=tuple(range(2, 2 + r)))  # convolve flips it back
        xp = np.pad(xc, [(0, 0), (0, 0), *spec.pads()])
        cin, cout = spec.in_channels // g, spec.out_channels // g
        full = [n - kk + 1 for n, kk in zip(xp.shape[2:], k.shape[2:])]
        y = np.zeros((xc.shape[0], spec.out_channels, *full), dtype=xc.dtype)
        for group, o, c in itertools.product(range(g), range(cout), range(cin)):
            out = group * cout + o
            # A size-1 kernel axis over the batch: one call for the whole batch.
            y[:, out] += convolve(xp[:, group * cin + c], k[out, c][None], mode="valid", method="direct")
        return y[(slice(None), slice(None), *(slice(None, None, s) for s in spec.stride))]

    def _transposed(self, xc: np.ndarray) -> np.ndarray:
        spec, convolve = self.spec, self._signal.convolve
        g = spec.groups
        k = self._canonical()  # (in, out/g, *k): the true-convolution kernel of the scatter
        n = xc.shape[0]
        up = np.zeros((n, spec.in_channels, *((i - 1) * s + 1 for i, s in zip(spec.spatial, spec.stride))), dtype=xc.dtype)
        up[(slice(None), slice(None), *(slice(None, None, s) for s in spec.stride))] = xc
        cin, cout = spec.in_channels // g, spec.out_channels // g
        full = [u + kk - 1 + op for u, kk, op in zip(up.shape[2:], k.shape[2:], spec.output_padding)]
        y = np.zeros((n, spec.out_channels, *full), dtype=xc.dtype)
        inner = tuple(slice(0, u + kk - 1) for u, kk in zip(up.shape[2:], k.shape[2:]))
        for group, o, c in itertools.product(range(g), range(cout), range(cin)):
            i = group * cin + c
            y[(slice(None), group * cout + o, *inner)] += convolve(up[:, i], k[i, o][None], mode="full", method="direct")
        crop = tuple(slice(lo, lo + out) for (lo, _), out in zip(spec.pads(), spec.output_spatial))
        return y[(slice(None), slice(None), *crop)]


class ScipyBackend(Backend):
    name = "scipy"
    module = "scipy"

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        if isinstance(spec, ConvSpec) and dtype == "float16":
            return "scipy.signal.convolve has no float16 kernel (it raises 'Unsupported type')"
        if isinstance(spec, ConvSpec) and dtype == "bfloat16":
            return "scipy.signal.convolve does not take ml_dtypes bfloat16 arrays"
        return super().unsupported(spec, dtype)  # the dense layer is a numpy matmul: every dtype

    def build(self, spec: LayerSpec, dtype: str = "float32") -> ScipyLayer:
        self._check(spec, dtype)
        self.load()
        return ScipyLayer(spec, dtype)

"""The numpy reference: dense and (transposed) convolutions in vectorised numpy.

Loops run over kernel positions only (a handful), never over output positions. float16 and
bfloat16 compute in float32 and round the result, as CPU frameworks do; float64 computes
in float64.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from equivcheck.backends.base import ArrayLayer, Backend, check_input, np_dtype
from equivcheck.mapping import Mapping
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def to_channels_first(x: np.ndarray, data_format: str) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if data_format == CHANNELS_LAST and x.ndim > 2 else x


def from_channels_first(y: np.ndarray, data_format: str) -> np.ndarray:
    return np.moveaxis(y, 1, -1) if data_format == CHANNELS_LAST and y.ndim > 2 else y


def dense_features(spec: DenseSpec, x: np.ndarray) -> np.ndarray:
    """``x`` flattened in ``spec.flatten`` order, in the compute dtype: what the kernel's input axis meets."""
    xc = to_channels_first(x, spec.data_format)
    perm = [0] + [1 + spec.map_letters.index(a) for a in spec.flatten]
    return xc.transpose(perm).reshape(x.shape[0], -1).astype(_compute_dtype(x.dtype))


def dense_forward(spec: DenseSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """``Flatten`` in ``spec.flatten`` order, then ``x @ W + b``."""
    cdt = _compute_dtype(x.dtype)
    flat = dense_features(spec, x)
    w = kernel.astype(cdt, copy=False)
    y = flat @ (w if spec.kernel_layout == "IO" else w.T)
    if bias is not None:
        y = y + bias.astype(cdt)
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=256)
def _by_position(spec: ConvSpec) -> Mapping:
    """The stored kernel to ``(*k, g, O/g, I/g)`` in one copy: kernel positions first, so each slice is contiguous."""
    from equivcheck.planning import canonical

    g, r = spec.groups, spec.rank
    grouped = canonical(spec).reshape(g, spec.out_channels // g, spec.in_channels // g, *spec.kernel_size)
    return grouped.transpose(*range(3, 3 + r), 0, 1, 2)


def conv_forward(spec: ConvSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """A (transposed) convolution of any rank, with stride, dilation, padding and groups."""
    from equivcheck.planning import canonical

    cdt = _compute_dtype(x.dtype)
    xc = to_channels_first(x, spec.data_format).astype(cdt)
    n, g, r = xc.shape[0], spec.groups, spec.rank
    out_sp = spec.output_spatial
    if spec.transposed:
        k = canonical(spec).apply(kernel).astype(cdt, copy=False)  # (I, O/g, *k)
        y = _conv_transpose(xc, k, spec, out_sp)
    else:
        pads = [(0, 0), (0, 0), *spec.pads()]
        xp = np.pad(xc, pads)
        xg = xp.reshape(n, g, spec.in_channels // g, *xp.shape[2:])
        kg = _by_position(spec).apply(kernel).astype(cdt, copy=False)
        y = np.zeros((n, g, spec.out_channels // g, *out_sp), dtype=cdt)
        for pos in itertools.product(*(range(s) for s in spec.kernel_size)):
            window = tuple(
                slice(p * d, p * d + (o - 1) * s + 1, s)
                for p, d, o, s in zip(pos, spec.dilation, out_sp, spec.stride)
            )
            xs = xg[(slice(None), slice(None), slice(None), *window)]
            y += np.einsum("ngc...,goc->ngo...", xs, kg[pos])
        y = y.reshape(n, spec.out_channels, *out_sp)
    if bias is not None:
        y = y + bias.astype(cdt).reshape(-1, *(1,) * r)
    return from_channels_first(y, spec.data_format).astype(x.dtype)


def _conv_transpose(xc: np.ndarray, k: np.ndarray, spec: ConvSpec, out_sp: tuple[int, ...]) -> np.ndarray:
    """Scatter each input position through the kernel, then crop the padding."""
    n, g = xc.shape[0], spec.groups
    cin, cout = spec.in_channels // g, spec.out_channels // g
    xg = xc.reshape(n, g, cin, *xc.shape[2:])
    kg = k.reshape(g, cin, cout, *spec.kernel_size)
    full = [
        (i - 1) * s + d * (kk - 1) + 1 + op
        for i, s, d, kk, op in zip(spec.spatial, spec.stride, spec.dilation, spec.kernel_size, spec.output_padding)
    ]
    y = np.zeros((n, g, cout, *full), dtype=xc.dtype)
    for pos in itertools.product(*(range(s) for s in spec.kernel_size)):
        target = tuple(
            slice(p * d, p * d + (i - 1) * s + 1, s)
            for p, d, i, s in zip(pos, spec.dilation, spec.spatial, spec.stride)
        )
        y[(slice(None), slice(None), slice(None), *target)] += np.einsum("ngc...,gco->ngo...", xg, kg[(Ellipsis, *pos)])
    crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(spec.pads(), out_sp))
    return y[(slice(None), slice(None), slice(None), *crop)].reshape(n, spec.out_channels, *out_sp)


def forward(spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Run ``spec`` on a batch ``x`` (in ``spec.data_format``) with numpy."""
    if isinstance(spec, DenseSpec):
        return dense_forward(spec, kernel, bias, x)
    return conv_forward(spec, kernel, bias, x)


class NumpyLayer(ArrayLayer):
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(self.spec, x)
        return forward(self.spec, self.kernel, self.bias, x)


class NumpyBackend(Backend):
    name = "numpy"
    module = "numpy"

    def build(self, spec: LayerSpec, dtype: str = "float32") -> NumpyLayer:
        self._check(spec, dtype)
        return NumpyLayer(spec, dtype)

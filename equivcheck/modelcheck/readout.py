"""The data of a model check's first-divergence picture: where a converted kernel's weights come from.

Computed by the check (numpy only, bounded in size) and stored on the layer row; drawn by
:mod:`equivcheck.report.readout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_READOUT", "kernel_readout"]

MAX_READOUT = 64  # cells per side of a stored read-out (a larger kernel map is sampled)
_SEARCH = 2_000_000  # source weights searched for the converted kernel's values


def _cells(a: np.ndarray) -> list[list[int | None]]:
    return [[None if not math.isfinite(v) else int(v) for v in row] for row in a.tolist()]


def kernel_readout(source: Any, target: Any, kernel: np.ndarray, new_kernel: np.ndarray) -> dict[str, Any] | None:
    """Where a converted kernel's weights come from, found by value in the source kernel.

    ``source``/``target``: the two layers' specs; ``kernel``/``new_kernel``: their stored kernels.
    Returns ``{"position", "channel", "step"}``: for the converted kernel's output 0, input
    channel 0 (every input channel of output 0 for a flat dense layer), the source map position
    (row-major) and the input channel of the source weight each holds — ``None`` where it holds
    none of the source's (first output channels') weights — every ``step``-th cell per side
    (at most :data:`MAX_READOUT`). ``None`` when the kernels do not have the specs' shapes.
    """
    from equivcheck.planning import canonical

    kernel, new_kernel = np.asarray(kernel), np.asarray(new_kernel)
    if tuple(kernel.shape) != tuple(source.kernel_shape) or tuple(new_kernel.shape) != tuple(target.kernel_shape):
        return None
    cs = np.asarray(canonical(source).apply(kernel), dtype=np.float64)
    ct = np.asarray(canonical(target).apply(new_kernel), dtype=np.float64)
    per_out = max(1, math.prod(cs.shape[1:]))
    head = cs[: max(1, min(cs.shape[0], _SEARCH // per_out))]
    flat = head.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    values = ct[0, 0] if has_map(ct.shape) else ct[0].reshape(-1)
    at = np.clip(np.searchsorted(ordered, values), 0, len(ordered) - 1)
    found = ordered[at] == values
    where = np.unravel_index(order[at], head.shape)
    spatial = head.shape[2:]
    position = np.ravel_multi_index(where[2:], spatial) if spatial else np.zeros(values.shape, dtype=np.int64)
    grids = []
    for index in (position, where[1]):
        grids.append(grid(np.where(found, index, np.nan)))
    step = max(1, math.ceil(max(grids[0].shape) / MAX_READOUT))
    return {"position": _cells(grids[0][::step, ::step]), "channel": _cells(grids[1][::step, ::step]), "step": step}



def grid(a: np.ndarray) -> np.ndarray:
    """A 0–3-D array as a 2-D image: a row for 1-D, depth slices side by side for 3-D."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 3:
        gap = np.full((a.shape[1], 1), np.nan)
        return np.concatenate([p for s in a for p in (s, gap)][:-1], axis=1)
    return a


def has_map(shape: Sequence[int]) -> bool:
    return math.prod(shape[2:]) > 1

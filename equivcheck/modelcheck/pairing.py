"""Pair the converted model's linear layers with the source's: execution order, kind, weight count.

An alignment of the two execution orders (longest common subsequence) where two layers may
pair when they hold the same number of kernel weights and are of compatible kinds: the same
kind scores highest; a dense layer may pair with a convolution (a convolutionalized head)
and a convolution with a depthwise one (``groups`` spelled differently). Layers left over are
*unpaired* and reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from equivcheck.modelcheck.layers import Linear

__all__ = ["pair_layers"]

_COMPATIBLE = {frozenset(("dense", "conv")), frozenset(("conv", "depthwise"))}


def _score(a: Linear, b: Linear) -> int:
    if a.weights != b.weights:
        return 0
    if a.kind == b.kind:
        return 3
    return 2 if frozenset((a.kind, b.kind)) in _COMPATIBLE else 0


def pair_layers(source: Sequence[Linear], converted: Sequence[Linear]) -> tuple[list[tuple[Linear, Linear]], list[Linear], list[Linear]]:
    """(pairs in source execution order, unpaired source layers, unpaired converted layers)."""
    n, m = len(source), len(converted)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            s = _score(source[i], converted[j])
            best[i][j] = max(best[i + 1][j], best[i][j + 1], best[i + 1][j + 1] + s if s else 0)
    pairs, i, j = [], 0, 0
    lone_s: list[Linear] = []
    lone_c: list[Linear] = []
    while i < n and j < m:
        s = _score(source[i], converted[j])
        if s and best[i][j] == best[i + 1][j + 1] + s:
            pairs.append((source[i], converted[j]))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            lone_s.append(source[i])
            i += 1
        else:
            lone_c.append(converted[j])
            j += 1
    lone_s += source[i:]
    lone_c += converted[j:]
    return pairs, lone_s, lone_c

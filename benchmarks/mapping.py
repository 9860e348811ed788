"""Mapping speed and peak memory on VGG16 fc6: (25088, 4096) float32 → its 7×7 conv kernel, flipped.

Every figure is measured in this process, side by side, and printed as a ratio to a plain
``copy()`` of the same array. Usage: ``python benchmarks/mapping.py [--repeat N] [--markdown]``.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

import equivcheck as ec

FC6 = dict(channels=512, spatial=(7, 7), units=4096)


def keras2_per_column(kernel: np.ndarray) -> np.ndarray:
    """Keras 2's ``convert_dense_weights_data_format`` loop (channels_last → first), then reshape + flip."""
    kernel = kernel.copy()
    h, w, c = 7, 7, 512
    for i in range(kernel.shape[1]):
        ki = kernel[:, i].reshape(h, w, c).transpose(2, 0, 1)
        kernel[:, i] = ki.reshape(-1)
    return np.ascontiguousarray(kernel.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1])


def _without_kernel(mapping: ec.Mapping, w: np.ndarray) -> np.ndarray:
    os.environ["EQUIVCHECK_NO_FASTCOPY"] = "1"
    try:
        return mapping.apply(w)
    finally:
        del os.environ["EQUIVCHECK_NO_FASTCOPY"]


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra_bytes(fn: Callable[[], object], fresh: bool = True) -> int:
    """Peak bytes allocated while ``fn`` runs, minus what it returns when that is a new array."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - (getattr(out, "nbytes", 0) if fresh else 0)


def rows(repeat: int = 3) -> list[tuple[str, float, float, float]]:
    w = np.random.default_rng(0).standard_normal((25088, 4096), dtype=np.float32)
    mapping = ec.plan(ec.spec("keras:dense", **FC6), ec.spec("theano:conv", **FC6))
    into, reused = np.empty(mapping.out_shape, np.float32), np.empty_like(w)
    candidates: list[tuple[str, Callable[[], object], int]] = [
        ("plain copy (baseline)", w.copy, repeat),
        (f"equivcheck Mapping.apply  [{mapping.code()}]", lambda: mapping.apply(w), repeat),
        ("equivcheck Mapping.apply(out=) into a reused array", lambda: mapping.apply(w, out=into), repeat),
        ("np.copyto into a reused array (the out= baseline)", lambda: np.copyto(reused, w), repeat),
        ("equivcheck Mapping.apply, numpy fallback (no compiled kernel)", lambda: _without_kernel(mapping, w), repeat),
        ("numpy one-liner + ascontiguousarray",
         lambda: np.ascontiguousarray(w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)[:, :, ::-1, ::-1]), repeat),
    ]
    try:
        import torch

        tw = torch.from_numpy(w)
        candidates.append(("torch permute + flip + contiguous",
                           lambda: tw.reshape(7, 7, 512, 4096).permute(3, 2, 0, 1).flip((2, 3)).contiguous(), repeat))
    except ImportError:
        pass
    candidates.append(("Keras 2 per-column loop + reshape + flip", lambda: keras2_per_column(w), 1))
    expected = mapping.apply(w)
    out = []
    base = None
    for name, fn, n in candidates:
        result = fn()
        if "baseline" not in name:
            got = result.numpy() if hasattr(result, "numpy") else result
            assert np.array_equal(got, expected), f"{name} computed a different kernel"
        seconds = best_time(fn, n)
        base = base or seconds
        extra = peak_extra_bytes(fn, fresh="reused" not in name) if "torch" not in name else float("nan")
        out.append((name, seconds, seconds / base, extra / w.nbytes))
    return out


def render(table: list[tuple[str, float, float, float]], markdown: bool = False) -> str:
    head = ("method", "seconds", "× copy", "peak extra memory (× output)")
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {s:.3f} | {r:.1f} | {m:.2f} |" for n, s, r, m in table]
    else:
        lines.append(f"{head[0]:75s} {head[1]:>8s} {head[2]:>7s} {head[3]:>10s}")
        lines += [f"{n:75s} {s:8.3f} {r:7.1f} {m:10.2f}" for n, s, r, m in table]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.repeat), args.markdown))


if __name__ == "__main__":
    main()

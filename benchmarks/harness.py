"""Harness overhead: one verified case (``verify_pair``, mutants included) against the bare work
of the same case — build both real layers, set weights, run each forward once — per backend.

Each figure is the median over rounds that alternate the two (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import equivcheck as ec
from equivcheck import backends

SHAPE = dict(channels=16, spatial=(7, 7), units=32)
PRESET = {"numpy": "onnx", "torch": "torch", "keras": "keras"}


def bare(backend: str, src, dst, x: np.ndarray, kernel, bias) -> None:
    b = backends.get(backend)
    s, t = b.build(src, "float32"), b.build(dst, "float32")
    s.set_weights(kernel, bias)
    t.set_weights(*ec.convert(src, dst, kernel, bias))
    s(x)
    t(x)


def rows(cases: int = 40, rounds: int = 5) -> list[tuple[str, float, float, float]]:
    """Per backend: (name, bare s, case s, case / bare), each the median over ``rounds`` rounds.

    A round times ``cases`` bare runs, then ``cases`` verified cases: the two alternate, so a busy
    machine slows both alike, and the median drops the rounds it slowed most.
    """
    out = []
    for backend, preset in PRESET.items():
        if not backends.get(backend).available():
            continue
        src, dst = ec.spec(f"{preset}:dense", **SHAPE), ec.spec(f"{preset}:conv", **SHAPE)
        rng = np.random.default_rng(0)
        kernel = rng.standard_normal(src.kernel_shape).astype(np.float32)
        bias = rng.standard_normal(src.bias_shape).astype(np.float32)
        x = rng.standard_normal((4, *src.input_shape)).astype(np.float32)
        bare(backend, src, dst, x, kernel, bias)  # warm up: framework import, first-call compilation
        ec.verify_pair(src, dst, source_backend=backend, target_backend=backend)
        t_bare, t_case = [], []
        for r in range(rounds):
            start = time.perf_counter()
            for _ in range(cases):
                bare(backend, src, dst, x, kernel, bias)
            t_bare.append((time.perf_counter() - start) / cases)
            start = time.perf_counter()
            for seed in range(r * cases, (r + 1) * cases):
                ec.verify_pair(src, dst, source_backend=backend, target_backend=backend, seed=seed)
            t_case.append((time.perf_counter() - start) / cases)
        ratio = statistics.median(c / b for b, c in zip(t_bare, t_case))
        out.append((backend, statistics.median(t_bare), statistics.median(t_case), ratio))
    return out


def render(table, markdown: bool = False) -> str:
    if markdown:
        return "\n".join(["| backend | bare forward passes (s) | verified case with mutants (s) | overhead × |",
                          "|---|---:|---:|---:|"] + [f"| {b} | {x:.4f} | {c:.4f} | {r:.1f} |" for b, x, c, r in table])
    return "\n".join(f"{b:8s} bare {x:.4f} s   case {c:.4f} s   {r:5.1f}×" for b, x, c, r in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.cases, args.rounds), args.markdown))


if __name__ == "__main__":
    main()

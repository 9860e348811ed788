"""Soundness of the verdict per layer kind and dtype, on this machine and as an older CPU.

For each backend, layer kind (:data:`equivcheck.backends.probe.LAYER_KINDS`) and dtype: the
layer's facts are probed once; then each trial draws verify's data
(:mod:`equivcheck.data`), runs the real layer with the right weights (a false alarm is a
rejection) and with one pair of distinct weights swapped (caught when rejected), both judged
exactly as ``verify_pair`` judges them (probed accumulation and roundings, non-zero fan-in).
Targets: 0 false alarms, ≥ 95 % of swaps caught. ``--older-cpu`` re-runs everything in a child
process with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TF_ENABLE_ONEDNN_OPTS=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

OLDER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "TF_ENABLE_ONEDNN_OPTS": "0"}
DTYPES = ("float32", "float16", "bfloat16")


def _trials(backend: str, spec, dtype: str, trials: int, facts) -> tuple[int, int, int, float]:
    """(false alarms, swaps caught, swaps tried, worst error/bound of a right conversion)."""
    from equivcheck import backends
    from equivcheck.backends.numpy import forward
    from equivcheck.compare import compare
    from equivcheck.data import nonzeros_for, sample_inputs, sample_weights
    from equivcheck.specs import fan_in

    layer = backends.get(backend).build(spec, dtype)
    f64 = np.float64
    alarms = caught = tried = 0
    worst = 0.0
    nonzeros = nonzeros_for(spec, [facts.accumulate])  # as verify_pair chooses them
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        kernel, bias = sample_weights(spec, dtype, rng, nonzeros=nonzeros)
        x = sample_inputs(spec, None, dtype, rng, nonzeros=nonzeros)  # (batch, channels, *spatial)
        if spec.data_format == "channels_last" and x.ndim > 2:
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        b64 = None if bias is None else bias.astype(f64)
        exact = forward(spec, kernel.astype(f64), b64, x.astype(f64))
        mag = forward(spec, np.abs(kernel.astype(f64)), None if b64 is None else np.abs(b64), np.abs(x.astype(f64)))
        nb = forward(spec, kernel.astype(f64), None, x.astype(f64)) if bias is not None and facts.roundings == 2 else None
        n = max(1, min(fan_in(spec), int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max(initial=1))))

        def judge(k: np.ndarray, exact=exact, mag=mag, nb=nb, n=n, bias=bias, x=x):
            layer.set_weights(k, bias)
            return compare(layer(x), exact, mag, dtype=dtype, fan_in=n, accumulate=facts.accumulate, exact_without_bias=nb)

        right = judge(kernel)
        alarms += not right.passed
        worst = max(worst, right.max_error_ratio)
        flat = kernel.reshape(-1)
        a, b = rng.choice(flat.size, 2, replace=False)
        if flat[a] == flat[b]:
            continue
        swapped = flat.copy()
        swapped[[a, b]] = swapped[[b, a]]
        tried += 1
        caught += not judge(swapped.reshape(kernel.shape)).passed
    return alarms, caught, tried, worst


def measure(trials: int, names: tuple[str, ...]) -> list[list]:
    from equivcheck import backends
    from equivcheck.backends.probe import layer_kinds, probe

    out = []
    for backend in names:
        if not backends.get(backend).available():
            continue
        for kind, spec in layer_kinds(backend).items():
            for dtype in DTYPES:
                facts = probe(backend, spec, dtype)
                if not facts.runs:
                    out.append([backend, kind, dtype, "does not run", None, None, None, None])
                    continue
                alarms, caught, tried, worst = _trials(backend, spec, dtype, trials, facts)
                summary = f"{facts.accumulate}, {facts.roundings}×"
                out.append([backend, kind, dtype, summary, alarms, trials, caught / max(tried, 1), worst])
    return out


def rows(trials: int = 300, backends: str = "torch,keras", older_cpu: bool = True) -> list[list]:
    names = tuple(backends.split(","))
    table = [["native", *r] for r in measure(trials, names)]
    if older_cpu:
        env = {**os.environ, **OLDER_CPU}
        cmd = [sys.executable, __file__, "--trials", str(trials), "--backends", backends, "--json"]
        child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        table += [["older CPU", *r] for r in json.loads(child.stdout.strip().splitlines()[-1])]
    return table


def render(table: list[list], markdown: bool = False) -> str:
    head = ["machine", "backend", "kind", "dtype", "probed sums, roundings", "false alarms", "swaps caught", "max err/bound"]
    lines = []
    for machine, backend, kind, dtype, facts, alarms, trials, rate, worst in table:
        if alarms is None:
            lines.append([machine, backend, kind, dtype, facts, "", "", ""])
        else:
            lines.append([machine, backend, kind, dtype, facts, f"{alarms}/{trials}", f"{rate:.1%}", f"{worst:.3f}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in lines])
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--backends", default="torch,keras")
    parser.add_argument("--json", action="store_true", help="print this machine's rows as JSON (the --older-cpu child)")
    parser.add_argument("--older-cpu", action="store_true", help="also run as an older CPU, in a child process")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.trials, tuple(args.backends.split(",")))))
        return
    print(render(rows(args.trials, args.backends, args.older_cpu)))


if __name__ == "__main__":
    main()

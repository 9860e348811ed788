"""Soundness of the verdict per backend, layer kind and dtype, through the public API, natively and as an older CPU.

For each backend, layer kind (:data:`equivcheck.backends.probe.LAYER_KINDS`, under the backend's
own preset; and lstm, gru and mha on torch and Keras, whose converters take and give named tensors) and
dtype, as a user would: ``ec.verify_pair`` with the right conversion (a
verdict other than ``pass`` is a false alarm; ``inconclusive`` is counted apart) and with a
converter that swaps one pair of distinct weights (caught when the verdict is ``fail``), and
``ec.check_converter`` with the same swapping converter (caught when it raises
:class:`equivcheck.ConversionCheckFailed`). The data are the product's own: nothing here draws,
judges or bounds anything. Targets: 0 false alarms, ≥ 95 % of swaps caught.
``--older-cpu`` re-runs everything in a child process with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TF_ENABLE_ONEDNN_OPTS=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import warnings

import numpy as np

OLDER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "TF_ENABLE_ONEDNN_OPTS": "0"}
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = "torch,keras,tf,jax,onnxruntime,tflite"


def swapper(seed: int):
    """A converter that keeps the kernel but swaps one pair of distinct weights (the same pair each call)."""

    def swap_one_pair(kernel, bias):
        k = np.array(kernel, copy=True)
        flat = k.reshape(-1)
        rng = np.random.default_rng(seed)
        for _ in range(100):
            a, b = rng.choice(flat.size, 2, replace=False)
            if flat[a] != flat[b]:
                flat[[a, b]] = flat[[b, a]]
                break
        return k, bias

    return swap_one_pair


def key_bias(name: str, size: int) -> range:
    """The flat entries of tensor ``name`` that are an attention key bias (torch's middle third of ``in_proj_bias``,
    Keras's ``key/bias``): a key bias adds ``q·b`` to every score of a query, which the softmax removes."""
    if name.split("/")[-2:] == ["key", "bias"]:
        return range(size)
    return range(size // 3, 2 * size // 3) if name == "in_proj_bias" else range(0)


def summed_biases(name: str, shape: tuple[int, ...], a: int, b: int) -> bool:
    """Whether flat entries ``a`` and ``b`` of a Keras GRU's ``bias`` (2, 3·units) are the input and the recurrent
    bias of one update or reset unit: those two are only ever added, so exchanging them changes nothing."""
    if name.split("/")[-1] != "bias" or len(shape) != 2 or shape[0] != 2 or shape[1] % 3:
        return False
    (ra, ca), (rb, cb) = divmod(int(a), shape[1]), divmod(int(b), shape[1])
    return ra != rb and ca == cb and ca < 2 * shape[1] // 3


def named_swapper(seed: int):
    """A converter of named tensors (recurrent and attention layers) that keeps them all but swaps one pair of
    distinct weights in one tensor (the same draws each call).

    A pair inside an attention key bias is passed over (the next pair is drawn; a tensor that is all key bias,
    Keras's ``key/bias``, is never chosen): exchanging two key-bias
    entries provably leaves the layer's function unchanged (softmax is shift-invariant per query:
    ``q·(k + b) = q·k + q·b`` is the same for every key), so such a converter makes no mistake; so is a pair of a
    Keras GRU's input and recurrent bias of one update or reset unit (:func:`summed_biases`).
    """

    def swap_one_pair(weights):
        out = {k: np.array(v, copy=True) for k, v in weights.items()}
        rng = np.random.default_rng(seed)
        names = sorted(k for k, v in out.items()  # a tensor holding a pair to swap: not a whole key bias
                       if np.unique(v).size > 1 and len(key_bias(k, v.size)) < v.size)
        name = names[rng.integers(len(names))]
        flat, inert = out[name].reshape(-1), key_bias(name, out[name].size)
        for _ in range(100):
            a, b = rng.choice(flat.size, 2, replace=False)
            if flat[a] != flat[b] and not (a in inert and b in inert) and not summed_biases(name, out[name].shape, a, b):
                flat[[a, b]] = flat[[b, a]]
                break
        return out

    return swap_one_pair


#: Recurrent and attention rows: the backends that run them, and each kind's preset sizes.
SEQUENCE_BACKENDS = ("torch", "keras")
SEQUENCE_KINDS = {"lstm": {"input_size": 5, "units": 6}, "gru": {"input_size": 5, "units": 6},
                  "mha": {"embed_dim": 8, "heads": 2}}


def trial_counts(spec, backend: str, dtype: str, trials: int, make_swapper) -> tuple[list, object]:
    """``[false alarms, inconclusive, trials, swaps caught by verify_pair, by check_converter]`` and the last right case.

    Per seed: the right conversion and a one-pair swap through ``ec.verify_pair``; on a third of the
    seeds the swap through ``ec.check_converter`` too (it runs the judge once more).
    """
    import equivcheck as ec

    alarms = inconclusive = caught = checker_caught = checker_tried = 0
    right = None
    for seed in range(trials):
        right = ec.verify_pair(spec, spec, source_backend=backend, target_backend=backend, dtype=dtype, seed=seed)
        alarms += right.verdict not in ("pass", "inconclusive")
        inconclusive += right.verdict == "inconclusive"
        wrong = ec.verify_pair(spec, spec, source_backend=backend, target_backend=backend, dtype=dtype, seed=seed,
                               converter=make_swapper(seed), mutants=False)
        caught += wrong.verdict == "fail"
        if seed % 3 == 0:
            checker_tried += 1
            try:
                ec.check_converter(make_swapper(seed), spec, spec, dtypes=[dtype], seed=seed)
            except ec.ConversionCheckFailed:
                checker_caught += 1
            except ec.CheckSkipped:
                checker_tried -= 1
    return [alarms, inconclusive, trials, caught / trials, checker_caught / max(checker_tried, 1)], right


def measure_sequence(trials: int, names: tuple[str, ...], kinds: tuple[str, ...] | None = None,
                     dtypes: tuple[str, ...] = DTYPES) -> list[list]:
    """The same three measures for recurrent and attention layers (a spec converted to itself); ``kinds``: only these."""
    import importlib.util

    import equivcheck as ec

    out = []
    for backend in (b for b in SEQUENCE_BACKENDS if b in names and importlib.util.find_spec(b) is not None):
        for kind, sizes in SEQUENCE_KINDS.items():
            if kinds is not None and kind not in kinds:
                continue
            spec = ec.spec(f"{backend}:{kind}", **sizes)
            for dtype in dtypes:
                counts, last = trial_counts(spec, backend, dtype, trials, named_swapper)
                accumulate = last.comparison.accumulate if last.comparison is not None else ""
                out.append([backend, kind, dtype, f"{accumulate} sums, running bound", *counts])
    return out


def cpu() -> str:
    """The CPU's model name and the features that change kernels: ``"Intel Xeon (x86_64 avx2 avx512_fp16 amx_bf16)"``."""
    from equivcheck.backends.probe import cpu_flags

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({cpu_flags()})"


def measure(trials: int, names: tuple[str, ...], kinds: tuple[str, ...] | None = None,
            dtypes: tuple[str, ...] = DTYPES) -> list[list]:
    from equivcheck import backends
    from equivcheck.backends.probe import layer_kinds, probe

    out = []
    for backend in names:
        if not backends.get(backend).available():
            continue
        for kind, spec in layer_kinds(backend).items():
            if kinds is not None and kind not in kinds:
                continue
            for dtype in dtypes:
                facts = probe(backend, spec, dtype)
                if not facts.runs:
                    out.append([backend, kind, dtype, "does not run", None, None, None, None, None])
                    continue
                counts, _ = trial_counts(spec, backend, dtype, trials, swapper)
                out.append([backend, kind, dtype, f"{facts.accumulate}, {facts.roundings}×", *counts])
    return out + measure_sequence(trials, names, kinds, dtypes)


def rows(trials: int = 60, backends: str = BACKENDS, older_cpu: bool = True, kinds: str | None = None,
         dtypes: str = ",".join(DTYPES)) -> list[list]:
    names = tuple(backends.split(","))
    only = None if kinds is None else tuple(kinds.split(","))
    table = [["native", *r] for r in measure(trials, names, only, tuple(dtypes.split(",")))]
    if older_cpu:
        env = {**os.environ, **OLDER_CPU}
        cmd = [sys.executable, __file__, "--trials", str(trials), "--backends", backends, "--dtypes", dtypes, "--json"]
        cmd += [] if kinds is None else ["--kinds", kinds]
        child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        table += [["older CPU", *r] for r in json.loads(child.stdout.strip().splitlines()[-1])]
    return table


def render(table: list[list], markdown: bool = False) -> str:
    head = ["machine", "backend", "kind", "dtype", "probed sums, roundings", "false alarms", "inconclusive",
            "swaps caught (verify_pair)", "swaps caught (check_converter)"]
    lines = []
    for machine, backend, kind, dtype, facts, alarms, inconclusive, trials, rate, checker in table:
        if alarms is None:
            lines.append([machine, backend, kind, dtype, facts, "", "", "", ""])
        else:
            lines.append([machine, backend, kind, dtype, facts, f"{alarms}/{trials}", f"{inconclusive}/{trials}",
                          f"{rate:.1%}", f"{checker:.1%}"])
    if markdown:
        return "\n".join([f"CPU: {cpu()}; older CPU: the same with {' '.join(f'{k}={v}' for k, v in OLDER_CPU.items())}.", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in lines])
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--backends", default=BACKENDS)
    parser.add_argument("--kinds", default=None, help="only these layer kinds, e.g. lstm,gru,mha (the sequence rows)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="only these dtypes, e.g. bfloat16")
    parser.add_argument("--json", action="store_true", help="print this machine's rows as JSON (the --older-cpu child)")
    parser.add_argument("--older-cpu", action="store_true", help="also run as an older CPU, in a child process")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.json:
        kinds = None if args.kinds is None else tuple(args.kinds.split(","))
        print(json.dumps(measure(args.trials, tuple(args.backends.split(",")), kinds, tuple(args.dtypes.split(",")))))
        return
    print(render(rows(args.trials, args.backends, args.older_cpu, args.kinds, args.dtypes), args.markdown))


if __name__ == "__main__":
    main()

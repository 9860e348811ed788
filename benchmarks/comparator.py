"""Comparator sensitivity at fan-in 25088, on real torch layers.

``keras:dense`` (512×7×7 → ``--units``) converted to ``torch:conv`` with the planned mapping.
Each trial draws fresh weights and inputs (:mod:`equivcheck.strategies`: sparse inputs, a
batch covering every input position), runs the target ``torch.nn.functional.conv2d`` with
the correct kernel and again with one random pair of kernel elements swapped, and asks each
checker whether the outputs agree:

- **equivcheck**: :func:`equivcheck.compare.compare` against the exact float64 result on the
  same rounded values (the bound of docs/comparator.md);
- **assert_close**: ``torch.testing.assert_close`` (default tolerances for the dtype)
  between the target output and a trusted reference: the exact result correctly rounded to
  the dtype (an independent rounding, as another framework's output would be);
- **assert_allclose**: ``numpy.testing.assert_allclose``'s default criterion (rtol 1e-7,
  atol 0), same pair.

The same three also run on "typical" data — dense N(0, 1) inputs, batch 4 — to show what
the input design contributes. A false alarm is a correct conversion rejected; a swap is
caught when the swapped conversion is rejected. Usage:
``python benchmarks/comparator.py [--trials 1000] [--units 4] [--markdown]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHANNELS, SPATIAL = 512, (7, 7)
DTYPES = ("float32", "float16", "bfloat16")
CHECKS = ("equivcheck", "assert_close", "assert_allclose")


def _torch_dtype(torch, name: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _to_torch(torch, a: np.ndarray, dtype: str):
    """A numpy array (ml_dtypes bfloat16 included) as a torch tensor of ``dtype``, values unchanged."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _verdicts(y, reference, exact, exact_nb, magnitude, fan_in: int, dtype: str, accumulate: str, torch) -> dict[str, bool]:
    """Which checks accept output ``y`` (a torch tensor of shape (batch, units))."""
    from equivcheck.compare import compare

    y64 = y.double().numpy()
    out = {"equivcheck": compare(y64, exact, magnitude, dtype=dtype, fan_in=fan_in, accumulate=accumulate,
                                 exact_without_bias=exact_nb).passed}
    try:
        torch.testing.assert_close(y, reference)
        out["assert_close"] = True
    except AssertionError:
        out["assert_close"] = False
    # numpy.testing.assert_allclose's default criterion (rtol=1e-7, atol=0), without building its message.
    ref = reference.double().numpy()
    out["assert_allclose"] = bool(np.all(np.abs(y64 - ref) <= 1e-7 * np.abs(ref)))
    return out


def _reference(x: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact ``x·Wᵀ`` and ``|x|·|W|ᵀ`` in float64 from the non-zero inputs only, and the most non-zeros in a sample.

    ``x`` (batch, C, H, W) in the canonical order of ``flat``'s columns. Products of two rounded
    values are exact in float64; only the float64 sums round (2⁻⁵³), as in any exact reference.
    """
    rows_x = x.reshape(len(x), -1)
    try:
        from scipy.sparse import csr_matrix
    except ImportError:  # scipy is optional: the dense product gives the same numbers, slower
        x64 = rows_x.astype(np.float64)
        return x64 @ flat.T, np.abs(x64) @ np.abs(flat).T, int(np.count_nonzero(x64, axis=1).max())
    index = np.flatnonzero(rows_x.view(f"u{x.dtype.itemsize}") != 0)  # on bits: fast for bfloat16 too
    rows, cols = np.divmod(index, rows_x.shape[1])
    values = rows_x[rows, cols].astype(np.float64)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=len(x)))))
    sparse = csr_matrix((values, cols, indptr), shape=rows_x.shape)
    exact = np.asarray(sparse @ flat.T)
    sparse.data = np.abs(sparse.data)
    magnitude = np.asarray(sparse @ np.abs(flat).T)
    return exact, magnitude, int(np.diff(indptr).max())


def _trial(torch, src, dst, mapping, dtype: str, rng: np.random.Generator, accumulate: str, typical: bool) -> dict:
    """One correct conversion and one with a swapped pair: {(data, check): (accepted correct, accepted swapped)}."""
    from equivcheck.strategies import sample_inputs, sample_weights

    F = torch.nn.functional
    tdt = _torch_dtype(torch, dtype)
    kernel, bias = sample_weights(src, dtype, rng)
    conv_k = mapping.apply(kernel)  # OIHW, still rounded to dtype (a permutation of the values)
    flat = conv_k.reshape(conv_k.shape[0], -1).astype(np.float64)  # (units, C·H·W) in canonical order
    b64 = bias.astype(np.float64)
    swapped = conv_k.reshape(-1).copy()
    i, j = rng.choice(swapped.size, 2, replace=False)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    swapped = swapped.reshape(conv_k.shape)
    tk, tks, tb = (_to_torch(torch, a, dtype) for a in (conv_k, swapped, bias))
    results = {}
    designs = [("designed", sample_inputs(src, None, dtype, rng))]
    if typical:
        designs.append(("typical", rng.standard_normal((4, CHANNELS, *SPATIAL)).astype(kernel.dtype)))
    for name, x in designs:
        tx = _to_torch(torch, x, dtype)
        exact_nb, magnitude, fan_in = _reference(x, flat)
        exact, magnitude = exact_nb + b64, magnitude + np.abs(b64)
        cl = torch.channels_last if dtype == "float16" else torch.contiguous_format  # the fast float16 CPU kernel
        txc = tx.contiguous(memory_format=cl)
        reference = torch.from_numpy(exact).to(tdt)  # the exact result, correctly rounded to dtype
        y_ok = F.conv2d(txc, tk, tb).reshape(len(x), -1)
        ok = _verdicts(y_ok, reference, exact, exact_nb, magnitude, fan_in, dtype, accumulate, torch)
        bad = _verdicts(F.conv2d(txc, tks, tb).reshape(len(x), -1), reference, exact, exact_nb, magnitude, fan_in,
                        dtype, accumulate, torch)
        for check in CHECKS:
            results[(name, check)] = (ok[check], bad[check])
        if name == "designed":
            results["noop"] = bool(conv_k.reshape(-1)[i] == conv_k.reshape(-1)[j])
            y = y_ok.double().numpy()
            from equivcheck.compare import error_bound

            bound = error_bound(exact, magnitude, dtype=dtype, fan_in=fan_in, accumulate=accumulate,
                                exact_without_bias=exact_nb)
            results["ratio"] = float(np.max(np.abs(y - exact) / bound))
    return results


def rows(trials: int = 1000, units: int = 4, seed: int = 0, typical: bool = True,
         nonzeros: int | None = None, coverage: int | None = None) -> list[dict]:
    """One row per (dtype, data, check): false alarms and swaps caught over ``trials`` trials.

    ``nonzeros``/``coverage`` override the input design of :mod:`equivcheck.strategies` (to explore it).
    """
    import torch

    import equivcheck as ec
    from equivcheck import strategies

    strategies.NONZEROS = nonzeros or strategies.NONZEROS
    strategies.COVERAGE = coverage or strategies.COVERAGE

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # small convs: one thread is faster and steadier than two fighting for cores
    src = ec.spec("keras:dense", channels=CHANNELS, spatial=SPATIAL, units=units)
    dst = ec.spec("torch:conv", channels=CHANNELS, spatial=SPATIAL, units=units)
    mapping = ec.plan(src, dst)
    try:
        from equivcheck import backends

        accumulate = {d: backends.get("torch").accumulate(d, dst) for d in DTYPES}
    except Exception:  # the torch backend is optional here: CPU torch sums float16/bfloat16 in float32
        accumulate = dict.fromkeys(DTYPES, "float32")
    out = []
    for dtype in DTYPES:
        rng = np.random.default_rng([seed, DTYPES.index(dtype)])
        start = time.perf_counter()
        counts: dict = {}
        noop, worst = 0, 0.0
        for _ in range(trials):
            res = _trial(torch, src, dst, mapping, dtype, rng, accumulate[dtype], typical)
            noop += res.pop("noop")
            worst = max(worst, res.pop("ratio"))
            for key, (ok, bad) in res.items():
                c = counts.setdefault(key, [0, 0])
                c[0] += not ok
                c[1] += not bad
        seconds = time.perf_counter() - start
        for (data, check), (alarms, caught) in counts.items():
            out.append({"dtype": dtype, "data": data, "check": check, "trials": trials, "false_alarms": alarms,
                        "caught": caught, "noop_swaps": noop, "worst_ratio": worst if check == "equivcheck" else None,
                        "seconds": seconds})
    return out


def render(table: list[dict], markdown: bool = False) -> str:
    head = ["dtype", "inputs", "check", "false alarms", "swaps caught", "equivcheck max err/bound (correct)"]
    lines = []
    for r in table:
        data = "designed (sparse, batch covers every input)" if r["data"] == "designed" else "typical (dense N(0,1), batch 4)"
        ratio = "" if r["worst_ratio"] is None or r["data"] != "designed" else f"{r['worst_ratio']:.3f}"
        lines.append([r["dtype"], data, r["check"], f"{r['false_alarms']}/{r['trials']}",
                      f"{r['caught'] / r['trials']:.1%}", ratio])
    notes = (f"keras:dense 512×7×7 → torch:conv, {table[0]['trials']} trials per dtype; "
             f"swaps of two equal values (undetectable by any check): "
             + ", ".join(f"{r['dtype']} {r['noop_swaps']}" for r in table if r["check"] == "equivcheck" and r["data"] == "designed"))
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(row) + " |" for row in lines] + ["", notes])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [head, *lines]) + "\n" + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000, help="trials per dtype (default 1000; 100 for a quick look)")
    parser.add_argument("--units", type=int, default=4, help="output units of the dense layer (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-typical", action="store_true", help="skip the dense batch-4 comparison rows")
    parser.add_argument("--nonzeros", type=int, help="override strategies.NONZEROS (input design)")
    parser.add_argument("--coverage", type=int, help="override strategies.COVERAGE (input design)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    table = rows(args.trials, args.units, args.seed, typical=not args.no_typical, nonzeros=args.nonzeros,
                 coverage=args.coverage)
    print(render(table, args.markdown))
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

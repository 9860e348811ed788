"""Every preset pair of the same layer kind, converted and verified on the real layers, per dtype: a matrix.

For each kind (LSTM, GRU, SimpleRNN; multi-head attention, and grouped-query attention with one key/value
head), every ordered pair of its presets (:data:`equivcheck.sequence.presets.RECURRENT` and
:data:`~equivcheck.sequence.presets.ATTENTION`, with the GRU reset placements and the grouped-query variants
as presets of their own) is checked with ``ec.verify_pair`` on each preset's own runtime, the weights
converted by the planned mapping, in float32, float16 and bfloat16. A right conversion should ``pass``;
``inconclusive`` or ``fail`` is a finding. ``skip``: a runtime that does not run the layer in that dtype (or
is not installed), with its reason. A pair that no conversion makes equivalent (a GRU with the reset gate
after the recurrent matmul and one with it before) is ``not convertible``: ``ec.verify_pair`` raises
:class:`equivcheck.NoMapping` for it, and its one-line reason is listed.

Sizes: input_size 5, units 6; embed_dim 8, heads 2 (kv_heads 1 for grouped-query attention).

    .venv/bin/python benchmarks/sequence_pairs.py              # text matrix
    .venv/bin/python benchmarks/sequence_pairs.py --markdown   # for reports/sequence_pairs.md
    .venv/bin/python benchmarks/sequence_pairs.py --quick      # three presets per kind
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import equivcheck as ec  # noqa: E402
from equivcheck.sequence.backends import backend_of  # noqa: E402
from equivcheck.sequence.presets import ATTENTION, RECURRENT  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
RECURRENT_SIZES = {"input_size": 5, "units": 6}
ATTENTION_SIZES = {"embed_dim": 8, "heads": 2}
#: Verdict → the matrix's symbol.
SYMBOLS = {"pass": "✓", "inconclusive": "?", "fail": "✗", "skip": "s", "error": "E"}
NOT_CONVERTIBLE = "not convertible"
LEGEND = ("✓ pass · ? inconclusive · ✗ fail · s skip (the runtime does not run it in that dtype) · "
          "E error (verify_pair raised) · — not convertible (no conversion makes the pair equivalent); "
          "one symbol per dtype, in the order {dtypes}")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A preset layer of the matrix: its label (the preset name and the flags that differ) and its spec."""

    label: str
    spec: object
    variant: str = ""  # the preset name and its own flags, without the group's


def _label(name: str, extra: dict) -> str:
    return name + (f"({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


def _presets(names: list[str], sizes: dict, variants: dict[str, tuple[dict, ...]], common: dict) -> list[Preset]:
    """Each preset of ``names`` with each of its flag variants (``{}``: its defaults) and ``common`` flags; a preset
    that does not take ``common`` (``ec.spec`` raises :class:`~equivcheck.SpecError`) is left out."""
    out = []
    for name in names:
        for extra in variants.get(name, ({},)):
            with contextlib.suppress(ec.SpecError):
                out.append(Preset(_label(name, {**extra, **common}), ec.spec(name, **sizes, **extra, **common),
                                  _label(name, extra)))
    return out


#: The GRU presets with a flag for the reset placement: both placements, each a preset of the matrix.
GRU_VARIANTS = {"keras:gru": ({}, {"reset_after": False}), "onnx:gru": ({}, {"linear_before_reset": True})}
#: ``--extended``: more groups, each its presets with these flags (those that do not take them left out).
EXTENDED = {"bidirectional": {"bidirectional": True}, "head_dim=3": {"head_dim": 3}, "no bias": {"bias": False},
            "GQA head_dim=3": {"kv_heads": 1, "head_dim": 3}}


def groups(extended: bool = False) -> dict[str, list[Preset]]:
    """Each kind's presets, in the order of the preset tables: ``{"LSTM": [...], ..., "GQA (kv_heads=1)": [...]}``;
    ``extended``: also bidirectional recurrent layers and attention with head_dim 3, without biases, and both."""
    cells = {"lstm": "LSTM", "gru": "GRU", "rnn": "SimpleRNN"}
    out: dict[str, list[Preset]] = {}
    flags: list[tuple[str, dict]] = [("", {})]
    if extended:
        flags.append(("bidirectional", EXTENDED["bidirectional"]))
    for suffix, common in flags:
        for cell, kind in cells.items():
            names = [f"{storage}:{c}" for storage, c in RECURRENT if c == cell]
            out[f"{kind} ({suffix})" if suffix else kind] = _presets(names, RECURRENT_SIZES, GRU_VARIANTS, common)
    names = [f"{storage}:mha" for storage in ATTENTION]
    out["MHA"] = _presets(names, ATTENTION_SIZES, {}, {})
    out["GQA (kv_heads=1)"] = _presets(names, ATTENTION_SIZES, {}, {"kv_heads": 1})
    if extended:
        for suffix in ("head_dim=3", "no bias"):
            out[f"MHA ({suffix})"] = _presets(names, ATTENTION_SIZES, {}, EXTENDED[suffix])
        out["GQA (kv_heads=1, head_dim=3)"] = _presets(names, ATTENTION_SIZES, {}, EXTENDED["GQA head_dim=3"])
    return out


def quick(presets: list[Preset]) -> list[Preset]:
    """A smaller subset: the first three presets of a kind, and for GRU both reset placements of Keras and ONNX."""
    if any(p.variant == "keras:gru(reset_after=False)" for p in presets):
        return [p for p in presets if p.variant in ("torch:gru", "keras:gru", "keras:gru(reset_after=False)", "onnx:gru")]
    return presets[:3]


@dataclasses.dataclass
class Cell:
    """One ordered pair: a verdict and reason per dtype, or ``not convertible`` with its reason."""

    source: Preset
    target: Preset
    verdicts: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def convertible(self) -> bool:
        return not any(v == NOT_CONVERTIBLE for v, _ in self.verdicts.values())

    def symbols(self, dtypes: tuple[str, ...]) -> str:
        if not self.convertible:
            return "—"
        return "".join(SYMBOLS[self.verdicts[d][0]] for d in dtypes)


def check(source: Preset, target: Preset, dtypes: tuple[str, ...], mutants: bool = True, seed: int = 0) -> Cell:
    """``ec.verify_pair`` of the pair on each preset's own runtime, per dtype."""
    cell = Cell(source, target)
    start = time.perf_counter()
    for dtype in dtypes:
        try:
            case = ec.verify_pair(source.spec, target.spec, source_backend=backend_of(source.spec),
                                  target_backend=backend_of(target.spec), dtype=dtype, mutants=mutants, seed=seed)
            cell.verdicts[dtype] = (case.verdict, case.reason)
        except ec.NoMapping as exc:  # raised by the plan, before anything runs: the same for every dtype
            cell.verdicts = {d: (NOT_CONVERTIBLE, _why(exc)) for d in dtypes}
            break
        except ec.EquivcheckError as exc:
            cell.verdicts[dtype] = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    cell.seconds = time.perf_counter() - start
    return cell


def _why(exc: Exception) -> str:
    """The reason of a :class:`~equivcheck.NoMapping` without the two spec descriptions before it."""
    text = str(exc).splitlines()[0]
    marker = text.find("): ", text.find(" to ")) if text.startswith("no mapping from") else -1
    return text[marker + 3 :] if marker != -1 else text


def run(kinds: dict[str, list[Preset]], dtypes: tuple[str, ...], mutants: bool = True, seed: int = 0,
        progress: bool = False) -> dict[str, list[Cell]]:
    """Every ordered pair of each kind: ``{kind: [Cell, ...]}`` (row-major)."""
    out = {}
    for kind, presets in kinds.items():
        out[kind] = []
        for source in presets:
            for target in presets:
                cell = check(source, target, dtypes, mutants, seed)
                out[kind].append(cell)
                if progress:
                    print(f"  {kind:18} {source.label:38} → {target.label:38} {cell.symbols(dtypes)} "
                          f"({cell.seconds:.1f}s)", file=sys.stderr, flush=True)
    return out


def totals(results: dict[str, list[Cell]], dtypes: tuple[str, ...]) -> list[list]:
    """Per dtype and overall: ``[dtype, pairs, pass, inconclusive, fail, skip, error, not convertible]``."""
    rows = []
    for dtype in (*dtypes, "all"):
        counts: Counter = Counter()
        pairs = 0
        for cells in results.values():
            for cell in cells:
                for d in dtypes if dtype == "all" else (dtype,):
                    pairs += 1
                    counts[cell.verdicts[d][0]] += 1
        rows.append([dtype, pairs, counts["pass"], counts["inconclusive"], counts["fail"], counts["skip"],
                     counts["error"], counts[NOT_CONVERTIBLE]])
    return rows


def cpu() -> str:
    from soundness import cpu as soundness_cpu

    return soundness_cpu()


def _table(header: list[str], rows: list[list], markdown: bool) -> list[str]:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    if markdown:
        out = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in cells[1:]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def render(results: dict[str, list[Cell]], dtypes: tuple[str, ...], markdown: bool = False,
           seconds: float | None = None, seed: int = 0) -> str:
    """The matrices (rows: source preset, columns: target preset), the totals and every verdict other than pass."""
    lines: list[str] = []
    heading = "### " if markdown else "== "
    lines.append(f"CPU: {cpu()}" + ("  " if markdown else ""))
    lines.append(f"Runtimes: {_versions()}" + ("  " if markdown else ""))
    lines.append(f"Seed: {seed}; sizes: input_size 5, units 6; embed_dim 8, heads 2" + ("  " if markdown else ""))
    if seconds is not None:
        lines.append(f"Run time: {seconds:.0f} s")
    lines += ["", LEGEND.format(dtypes="/".join(dtypes)), ""]
    for kind, cells in results.items():
        presets = list(dict.fromkeys(c.source.label for c in cells))
        by = {(c.source.label, c.target.label): c for c in cells}
        lines.append(f"{heading}{kind}")
        lines.append("")
        header = ["source \\ target", *(str(i + 1) for i in range(len(presets)))]
        rows = [[f"{i + 1} {p}", *(by[p, q].symbols(dtypes) for q in presets)] for i, p in enumerate(presets)]
        lines += _table(header, rows, markdown)
        lines.append("")
    lines.append(f"{heading}Totals")
    lines.append("")
    lines += _table(["dtype", "pairs", "pass", "inconclusive", "fail", "skip", "error", NOT_CONVERTIBLE],
                    totals(results, dtypes), markdown)
    lines.append("")
    lines += _details(results, dtypes, markdown, heading)
    return "\n".join(lines).rstrip() + "\n"


def _details(results: dict[str, list[Cell]], dtypes: tuple[str, ...], markdown: bool, heading: str) -> list[str]:
    bullet = "- " if markdown else "  "
    lines: list[str] = []
    bad = [(c, d) for cells in results.values() for c in cells for d in dtypes
           if c.verdicts[d][0] in ("fail", "inconclusive", "error")]
    lines += [f"{heading}Findings (fail, inconclusive, error)", ""]
    lines += [f"{bullet}{c.source.label} → {c.target.label}, {d}: **{c.verdicts[d][0]}**: {c.verdicts[d][1]}"
              if markdown else f"{bullet}{c.source.label} → {c.target.label}, {d}: {c.verdicts[d][0]}: {c.verdicts[d][1]}"
              for c, d in bad] or [f"{bullet}none: every convertible pair passes wherever it runs"]
    lines.append("")
    skips: dict[str, int] = Counter()
    for cells in results.values():
        for c in cells:
            for d in dtypes:
                if c.verdicts[d][0] == "skip":
                    skips[c.verdicts[d][1]] += 1
    lines += [f"{heading}Skips, by reason", ""]
    lines += [f"{bullet}{n} × {reason}" for reason, n in sorted(skips.items(), key=lambda kv: (-kv[1], kv[0]))] or [
        f"{bullet}none"]
    lines.append("")
    lines += [f"{heading}Not convertible, by reason", ""]
    reasons: dict[str, list[str]] = {}
    for cells in results.values():
        for c in cells:
            if not c.convertible:
                reasons.setdefault(c.verdicts[dtypes[0]][1], []).append(f"{c.source.label} → {c.target.label}")
    lines += [f"{bullet}{len(pairs)} × {reason}: {'; '.join(pairs)}" for reason, pairs in reasons.items()] or [
        f"{bullet}none"]
    return lines


def _versions() -> str:
    import importlib.metadata

    out = []
    for name, dists in (("torch", ("torch",)), ("keras", ("keras",)),
                        ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly")),
                        ("onnxruntime", ("onnxruntime",)), ("jax", ("jax",)), ("flax", ("flax",))):
        version = "not installed"
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
                break
        out.append(f"{name} {version}")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="markdown tables (for reports/sequence_pairs.md)")
    parser.add_argument("--quick", action="store_true", help="three presets per kind")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, e.g. float32")
    parser.add_argument("--extended", action="store_true", help="also bidirectional recurrent layers and attention "
                        "with head_dim 3, without biases, and grouped-query with head_dim 3")
    parser.add_argument("--seed", type=int, default=0, help="the seed of ec.verify_pair's draws")
    parser.add_argument("--kinds", default=None, help="only these kinds, e.g. LSTM,GRU,MHA")
    parser.add_argument("--no-mutants", action="store_true", help="skip the mutant check (faster; a pass then "
                        "only says the layers agree)")
    parser.add_argument("--progress", action="store_true", help="each pair on stderr as it is checked")
    args = parser.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    kinds = groups(args.extended)
    if args.kinds:
        wanted = {k.strip().lower() for k in args.kinds.split(",")}
        kinds = {k: v for k, v in kinds.items() if k.split()[0].lower() in wanted}
    if args.quick:
        kinds = {k: quick(v) for k, v in kinds.items()}
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    results = run(kinds, dtypes, mutants=not args.no_mutants, seed=args.seed, progress=args.progress)
    print(render(results, dtypes, args.markdown, time.perf_counter() - start, args.seed), end="")
    return int(any(c.verdicts[d][0] in ("fail", "error") for cells in results.values() for c in cells for d in dtypes))


if __name__ == "__main__":
    sys.exit(main())

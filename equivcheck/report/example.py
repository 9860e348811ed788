"""A small real run with two deliberately wrong converters, for the committed example report.

    python -m equivcheck.report.example reports/example [--backends numpy,torch]

The example's run id and time are fixed and it names no machine (platform, CPU), and it is
rewritten only when what it shows changes (the checks, verdicts, mappings, mutation outcomes):
``make demo`` leaves a clean checkout clean.

Checks keras:dense → torch:conv and theano:dense → theano:conv with the planned mapping
and with a hand-written converter that makes a classic mistake (flattening Keras' HWC map as
if it were CHW; forgetting Theano's flip), plus a torch:conv → keras:conv pair whose kernel
is smaller than the map, so the pictures show an output map too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["essence", "example_cases", "example_environment", "example_runs", "main"]


def _keras_as_chw(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Wrong: reads the Keras (HWC-flattened) dense kernel as if flattened CHW."""
    return kernel.T.reshape(2, 3, 6, 7), bias


def _theano_without_flip(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Wrong: forgets that Theano's conv flips its kernel."""
    return kernel.T.reshape(2, 3, 5, 5), bias


def example_runs(backends: Sequence[str] = ("numpy",), seed: int = 0) -> list[tuple[str, list[Any]]]:
    """``(converter name, its cases)`` for five kinds of check, two wrong converters among them."""
    import equivcheck as ec
    from equivcheck.verification import verify

    keras_dense = ec.spec("keras:dense", channels=3, spatial=(6, 7), units=2)
    torch_conv = ec.spec("torch:conv", channels=3, spatial=(6, 7), units=2)
    theano_dense = ec.spec("theano:dense", channels=3, spatial=(5, 5), units=2)
    theano_conv = ec.spec("theano:conv", channels=3, spatial=(5, 5), units=2)
    small_torch = ec.spec("torch:conv", channels=3, spatial=(9, 9), units=2, kernel_size=(3, 3))
    small_keras = ec.spec("keras:conv", channels=3, spatial=(9, 9), units=2, kernel_size=(3, 3))
    pairs = [(a, b) for a in backends for b in backends]
    return [
        ("planned mapping", verify(keras_dense, torch_conv, backends=pairs, seed=seed)),
        ("_keras_as_chw", verify(keras_dense, torch_conv, backends=[("numpy", b) for b in backends],
                                 converter=_keras_as_chw, seed=seed)),
        ("planned mapping", verify(theano_dense, theano_conv, backends=[("numpy", "numpy")], seed=seed)),
        ("_theano_without_flip", verify(theano_dense, theano_conv, backends=[("numpy", "numpy")],
                                        converter=_theano_without_flip, seed=seed)),
        ("planned mapping", verify(small_torch, small_keras, backends=[("numpy", "numpy")], seed=seed)),
    ]


def example_cases(backends: Sequence[str] = ("numpy",), seed: int = 0) -> list[Any]:
    """The cases of :func:`example_runs`, in order."""
    return [case for _, cases in example_runs(backends, seed) for case in cases]


#: The committed example's run id and time: fixed, so regenerating it on any machine, any day, changes nothing.
EXAMPLE_RUN_ID = "example"
EXAMPLE_CREATED = "2026-01-01T00:00:00+00:00"
#: What the example records of the machine in place of its platform (kernel) and CPU strings.
NOT_RECORDED = "not recorded in the example"


def example_environment(seed: int) -> dict[str, Any]:
    """This machine's environment with the strings that name the machine itself left out."""
    from equivcheck.report import environment

    env = environment(seed)
    env.update(platform=NOT_RECORDED, machine=NOT_RECORDED, cpus=None)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    from equivcheck.report import case_record, write_report

    parser = argparse.ArgumentParser(prog="python -m equivcheck.report.example", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--backends", default="numpy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = [{**case_record(case), "id": None, "converter": name}
             for name, run in example_runs([b for b in args.backends.split(",") if b], seed=args.seed) for case in run]
    args.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.directory) as tmp:
        paths = write_report(tmp, cases, seed=args.seed, run_id=EXAMPLE_RUN_ID, created=EXAMPLE_CREATED,
                             environment=example_environment(args.seed),
                             command=f"python -m equivcheck.report.example {args.directory} --backends {args.backends}")
        if _same_run(Path(tmp) / "equivcheck.json", args.directory / "equivcheck.json"):
            print(f"{args.directory} is up to date (the same checks give the same verdicts)")
            return 0
        for path in paths:
            os.replace(path, args.directory / path.name)
            print(f"wrote {args.directory / path.name}")
    return 0


#: What a case of the example is compared by: what was checked and what came of it, not the machine's numbers.
_CASE_FIELDS = ("id", "title", "converter", "source", "target", "source_backend", "target_backend", "dtype", "verdict",
                "mapping", "diagnosis")


def essence(doc: dict[str, Any]) -> dict[str, Any]:
    """A report less what changes from machine to machine: versions, probed facts, errors and bounds, pictures.

    What remains is what the example shows, with its fixed run id and time and the machine left
    unnamed: an example written before those were fixed is written again, once.
    """
    cases = [{**{k: c.get(k) for k in _CASE_FIELDS},
              "mutations": [(m.get("name"), m.get("outcome")) for m in c.get("mutations") or []]}
             for c in doc.get("cases") or []]
    env = doc.get("environment") if isinstance(doc.get("environment"), dict) else {}
    return {"schema_version": doc.get("schema_version"), "run": doc.get("run"), "summary": doc.get("summary"),
            "machine": (env.get("platform"), env.get("machine"), env.get("cpus")),
            "conventions": doc.get("conventions"), "cases": cases, "extra": doc.get("extra")}


def _same_run(new: Path, old: Path) -> bool:
    """Whether the committed example ``old`` already shows what a new run ``new`` shows (see :func:`essence`)."""
    if not old.is_file():
        return False
    try:
        docs = [json.loads(p.read_text(encoding="utf-8")) for p in (new, old)]
    except (OSError, ValueError):
        return False
    return all(isinstance(d, dict) for d in docs) and essence(docs[0]) == essence(docs[1])


if __name__ == "__main__":
    raise SystemExit(main())

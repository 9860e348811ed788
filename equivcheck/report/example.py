"""A small real run with two deliberately wrong converters, for the committed example report.

    python -m equivcheck.report.example reports/example [--backends numpy,torch]

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

__all__ = ["example_cases", "example_runs", "main"]


def _keras_as_chw(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Wrong: reads the Keras (HWC-flattened) dense kernel as if flattened CHW."""
    return kernel.T.reshape(2, 3, 6, 7), bias


def _theano_without_flip(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Wrong: forgets that Theano's conv flips its kernel."""
    return kernel.T.reshape(2, 3, 5, 5), bias


def example_runs(backends: Sequence[str] = ("numpy",), seed: int = 0) -> list[tuple[str, list[Any]]]:
    """``(converter name, its cases)`` for five kinds of check, two wrong converters among them."""
    import equivcheck as ec
    from equivcheck.verify import verify

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
        paths = write_report(tmp, cases, seed=args.seed,
                             command=f"python -m equivcheck.report.example {args.directory} --backends {args.backends}")
        if _same_run(Path(tmp) / "equivcheck.json", args.directory / "equivcheck.json"):
            print(f"{args.directory} is up to date (only the run id and time would change)")
            return 0
        for path in paths:
            os.replace(path, args.directory / path.name)
            print(f"wrote {args.directory / path.name}")
    return 0


def _same_run(new: Path, old: Path) -> bool:
    """Whether two reports differ at most in their run id and creation time."""
    if not old.is_file():
        return False
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in (new, old)]
    for doc in docs:
        doc["run"].pop("run_id", None)
        doc["run"].pop("created", None)
    return docs[0] == docs[1]


if __name__ == "__main__":
    raise SystemExit(main())

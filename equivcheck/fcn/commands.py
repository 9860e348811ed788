"""File-to-file model commands behind ``equivcheck convolutionalize`` and ``equivcheck verify-model``.

Supported model files:

* ``.keras`` — a whole Keras model (Sequential or Functional), loaded with ``safe_mode=True``.
* ``.pt`` / ``.pth`` / ``.safetensors`` / ``.npz`` — a *state dict* of equivcheck's own
  VGG16-style torch model (:mod:`equivcheck.fcn.vgg`, torchvision's key names). A state
  dict has no architecture, so other torch models are converted in Python:
  ``equivcheck.convolutionalize(model, input_shape=(3, 224, 224))``.

``.weights.h5`` files hold weights without an architecture and are refused here with that
reason; a pickled torch module is refused as code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError

__all__ = ["convolutionalize_file", "load_model", "print_verification", "save_model", "verify_model_cli"]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


def _is_keras_path(p: Path) -> bool:
    return p.suffix == ".keras"


def load_model(path: str | Path) -> Any:
    """A model from a file: a ``.keras`` model, or the VGG16-style torch model from its state dict."""
    from equivcheck import files

    p = Path(path)
    if p.name.endswith(".weights.h5") or p.suffix in files.H5_SUFFIXES or _is_keras_path(p):
        return files.load_keras_model(p)
    if p.suffix in STATE_DICT_SUFFIXES:
        arrays = files.load_arrays(p)
        if importlib.util.find_spec("torch") is None:
            raise FileFormatError(f"input={str(p)!r} is a torch state dict: pip install 'equivcheck[torch]'")
        from equivcheck.fcn import vgg

        return vgg.from_state_dict(arrays)
    raise FileFormatError(f"input={str(p)!r} has suffix {p.suffix!r}: expected a .keras model or a .pt/.pth/.safetensors/.npz "
                          "state dict of equivcheck's VGG16-style model")


def save_model(model: Any, path: str | Path, *, force: bool = False, protect: tuple = ()) -> None:
    """Write ``model`` atomically: ``.keras`` for Keras, a state dict (suffix decides the format) for torch."""
    from equivcheck import files
    from equivcheck.fcn.keras import is_keras_model

    p = Path(path)
    if is_keras_model(model):
        files.save_keras_model(model, p, force=force, protect=protect)
        return
    if p.suffix not in STATE_DICT_SUFFIXES:
        raise FileFormatError(f"output={str(p)!r} has suffix {p.suffix!r}: a torch model is written as a state dict "
                              ".pt, .pth, .safetensors or .npz")
    from equivcheck.files import tensor_to_numpy

    arrays = {k: tensor_to_numpy(v) for k, v in model.state_dict().items()}
    files.save_arrays(p, arrays, force=force, protect=protect)


def _check_input(p: Path) -> None:
    """Refuse an unsupported input by its name, before anything is read or written."""
    from equivcheck import files

    if p.name.endswith(".weights.h5") or p.suffix in files.H5_SUFFIXES:
        files.load_keras_model(p)  # raises with the reason
    if not _is_keras_path(p) and p.suffix not in STATE_DICT_SUFFIXES:
        raise FileFormatError(f"input={str(p)!r} has suffix {p.suffix!r}: expected a .keras model or a .pt/.pth/.safetensors/.npz "
                              "state dict of equivcheck's VGG16-style model")


def _check_output(input: Path, output: Path, force: bool) -> None:
    _check_input(input)
    if output.exists() and input.exists() and output.resolve() == input.resolve():
        raise FileFormatError(f"output={str(output)!r} is the input file: write to a new file instead")
    if output.exists() and not force:
        raise FileFormatError(f"output={str(output)!r} already exists: pass --force (force=True) to replace it")
    if _is_keras_path(input) != _is_keras_path(output):
        raise FileFormatError(f"output={str(output)!r} must be the same kind of model file as input={str(input)!r}: "
                              ".keras to .keras, or a torch state dict to a state dict")


def convolutionalize_file(input: str | Path, output: str | Path, *, force: bool = False) -> None:
    """Read a model, convolutionalize it, write it atomically (never over the input)."""
    from equivcheck.fcn import convolutionalize

    src, dst = Path(input), Path(output)
    _check_output(src, dst, force)
    model = load_model(src)
    if not _is_keras_path(src) and _is_converted(model):
        raise FileFormatError(f"input={str(src)!r} is already convolutionalized (classifier.0.weight is a conv kernel)")
    save_model(convolutionalize(model), dst, force=force, protect=(src,))


def _is_converted(model: Any) -> bool:
    return not hasattr(model, "classifier") or type(model.classifier[0]).__name__.startswith("Conv")


def verify_model_cli(args: argparse.Namespace) -> int:
    """``equivcheck verify-model ORIGINAL CONVERTED [--size H,W] [--json] [--report DIR]``; 0 pass, 1 fail."""
    from equivcheck.fcn import verify_model

    if Path(args.original).resolve() == Path(args.converted).resolve():
        raise FileFormatError(f"ORIGINAL and CONVERTED are the same file ({args.original}): "
                              "pass the model and its convolutionalized version")
    original, converted = load_model(args.original), load_model(args.converted)
    size = tuple(args.size) if getattr(args, "size", None) else None
    result = verify_model(original, converted, larger=size)
    if getattr(args, "report", None):
        write_model_report(args.report, [result], command="verify-model")
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_verification(result)
    return 0 if result.passed else 1


def write_model_report(directory: str | Path, results: list[Any], *, cases: list[Any] | None = None,
                       command: str = "verify-model", seed: int = 0, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write the report with ``results`` under ``extra["models"]`` (and any further ``extra`` sections)."""
    from equivcheck.report import write_report

    sections = {"models": [r.to_dict() for r in results], **(extra or {})}
    return write_report(directory, cases or [], seed=seed, command=command, extra=sections)


def print_verification(result: Any, console: Any = None) -> None:
    """A table of the checks (rich)."""
    from rich.console import Console
    from rich.table import Table

    style = {"pass": "green", "fail": "red", "n/a": "dim"}
    table = Table(title=f"{result.framework}: {result.model} ({result.dtype}) — {result.verdict}")
    for col in ("check", "input", "positions", "max |err|", "bound at worst", "worst err/bound", "verdict"):
        table.add_column(col)
    for c in result.checks:
        comp = c.comparison
        shape = result.input_shape if c.name in ("training size", "mutants") else result.larger_shape
        table.add_row(
            c.name, "×".join(map(str, shape or ())), str(len(c.positions)) if c.positions else "-",
            "-" if comp is None else f"{comp.max_abs_error:.3g}",
            "-" if comp is None else f"{comp.bound_at_worst:.3g}",
            "-" if comp is None else f"{comp.max_error_ratio:.3g}",
            f"[{style[c.verdict]}]{c.verdict}[/]",
        )
    console = console or Console()
    console.print(table)
    for c in result.checks:
        if c.detail and (c.verdict != "pass" or c.name == "mutants"):
            console.print(f"  [bold]{c.name}[/]: {c.detail}")

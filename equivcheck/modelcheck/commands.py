"""``equivcheck check-models SRC DST``: a converted model file against its source, layer by layer.

``SRC`` and ``DST`` are ``.keras`` models or torch state dicts (``.pt``/``.pth``/``.safetensors``/
``.npz``); ``--model MODULE:FACTORY`` builds the torch architecture a state dict loads into
(without it, equivcheck's own VGG16-style model is rebuilt from the weight shapes). Exit 0
pass (or inconclusive), 1 fail (the first wrong layer is named), 2 user error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError

__all__ = ["add_parser", "cmd_check_models", "load_model"]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated shape, e.g. 2,3,224,224") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape with a batch axis first, e.g. 2,3,224,224")
    return shape


def add_parser(sub: Any) -> None:
    """Add ``check-models`` to the ``equivcheck`` sub-command parsers."""
    text = "check a converted model against its source layer by layer: the first wrong layer, its mistake and the fix"
    p = sub.add_parser("check-models", help=text, description=text)
    p.set_defaults(func=cmd_check_models)
    p.add_argument("source", metavar="SRC", help=".keras model or torch state dict")
    p.add_argument("converted", metavar="DST", help=".keras model or torch state dict")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="the source model's input, batch first (default: what a model records)")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="builds the torch architecture for a state-dict file")
    p.add_argument("--dtype", default="float32", help="comma-separated dtypes to run in (torch models are cast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mutants", action="store_true", help="skip showing the data rejects each plausible mistake")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html and modelcheck.md to DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def load_model(path: str | Path, factory: str | None = None) -> Any:
    """A model from a ``.keras`` file, or a torch state dict loaded into ``factory()`` (``MODULE:FACTORY``)."""
    from equivcheck import files

    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"input={str(p)!r} does not exist")
    if p.suffix == ".keras":
        return files.load_keras_model(p)
    if p.suffix not in STATE_DICT_SUFFIXES:
        raise FileFormatError(f"input={str(p)!r} has suffix {p.suffix!r}: expected a .keras model or a torch state dict "
                              "(.pt, .pth, .safetensors, .npz)")
    if factory is None:
        from equivcheck.models.commands import load_model as load_vgg

        return load_vgg(p)
    from equivcheck.explore.objects import load_object
    from equivcheck.modelcheck.converter import _build, load_weights

    model = _build(load_object(factory), f"--model {factory}")
    return load_weights(model, files.load_arrays(p), role=f"state dict {p.name}")


def cmd_check_models(args: argparse.Namespace) -> int:
    from equivcheck.errors import SpecError
    from equivcheck.modelcheck import check_models

    if args.seed < 0:
        raise SpecError(f"--seed={args.seed} is not valid: expected a non-negative integer")
    source = load_model(args.source, args.model)
    converted = load_model(args.converted, args.model)
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    result = check_models(source, converted, input_shape=args.input_shape, dtypes=dtypes, seed=args.seed,
                          mutants=not args.no_mutants)
    if args.report:
        _write_report(args.report, result)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.render())
    if result.verdict == "fail":
        if not args.json:
            first = result.first_divergence
            print(f"FAIL: first wrong layer {first.label}" if first is not None else f"FAIL: {result.reason}")
        return 1
    return 0


def _write_report(directory: str, result: Any) -> None:
    from equivcheck.files import atomic_write_text

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from equivcheck.report import write_report

        write_report(out, [], seed=result.seed, command="check-models", extra={"modelchecks": [result.to_dict()]})
    except ImportError:
        pass
    atomic_write_text(out / "modelcheck.md", result.render(markdown=True) + "\n")

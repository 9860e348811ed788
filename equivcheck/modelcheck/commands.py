"""``equivcheck check-models SRC DST``: a converted model file against its source, layer by layer.

``SRC`` and ``DST`` are ``.keras``, ``.h5`` (tf_keras), ``.onnx`` or ``.tflite`` models or torch state dicts (``.pt``/``.pth``/
``.safetensors``/``.npz``); ``--model MODULE:FACTORY`` builds the torch architecture a state dict loads into
(without it, equivcheck's own VGG16-style model is rebuilt from the weight shapes). Exit 0
pass (or inconclusive), 1 fail (the first wrong layer is named), 2 user error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError

__all__ = ["cmd_check_models", "load_model"]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")


def load_model(path: str | Path, factory: str | None = None) -> Any:
    """A model from a ``.keras`` file, or a torch state dict loaded into ``factory()`` (``MODULE:FACTORY``)."""
    from equivcheck import files

    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"input={str(p)!r} does not exist")
    from equivcheck.modelcheck.tf_keras_adapter import is_tf_keras_file, load_tf_keras_model

    if is_tf_keras_file(p):  # Keras 2: .h5, a SavedModel directory, a .keras archive tf_keras wrote
        return load_tf_keras_model(p)
    if p.suffix == ".keras":
        return files.load_keras_model(p)
    if p.suffix in (".onnx", ".tflite"):
        return str(p)  # check_models reads .onnx and .tflite paths
    if p.suffix not in STATE_DICT_SUFFIXES:
        raise FileFormatError(f"input={str(p)!r} has suffix {p.suffix!r}: expected a .keras, .h5 (tf_keras), .onnx or "
                              ".tflite model or a torch state dict (.pt, .pth, .safetensors, .npz)")
    if factory is None:
        from equivcheck.errors import EquivcheckError
        from equivcheck.fcn.commands import load_model as load_vgg

        try:
            return load_vgg(p)
        except EquivcheckError as exc:
            raise FileFormatError(f"input={str(p)!r} is a state dict of weights, not a model: pass --model MODULE:FACTORY "
                                  "(a function that builds its torch architecture, e.g. --model mypkg.nets:make_net); "
                                  f"without it only equivcheck's VGG16-style model is rebuilt from the weights "
                                  f"({str(exc).splitlines()[0][:160]})") from None
    from equivcheck.exploration.objects import load_object
    from equivcheck.modelcheck.converter import build_model, load_weights

    arrays = files.load_arrays(p)  # the file first: a bad one is refused before the factory imports its framework
    model = build_model(load_object(factory), f"--model {factory}")
    return load_weights(model, arrays, role=f"state dict {p.name}")


def cmd_check_models(args: argparse.Namespace) -> int:
    from equivcheck.errors import SpecError
    from equivcheck.modelcheck import check_models

    if args.seed < 0:
        raise SpecError(f"--seed={args.seed} is not valid: expected a non-negative integer")
    if getattr(args, "fix", None):
        from equivcheck.modelcheck.repair import check_fix_output

        check_fix_output(args.fix, args.converted, force=args.force)
    source = load_model(args.source, args.model)
    converted = load_model(args.converted, args.model)
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    result = check_models(source, converted, input_shape=args.input_shape, dtypes=dtypes, seed=args.seed,
                          mutants=not args.no_mutants)
    if args.report:
        _write_report(args.report, result)
    if getattr(args, "fix", None):
        return _fix(args, result)
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


def _fix(args: argparse.Namespace, result: Any) -> int:
    """``--fix OUT``: repair, re-check, write OUT unless the repaired model still fails; 0 only when it passes."""
    from equivcheck.modelcheck.repair import save_model

    if not args.json:
        print(result.render())
    repaired = result.repair()  # a failing layer with no identified fix: one line, exit 2
    if repaired.check.verdict != "fail":
        save_model(repaired.model, args.fix, force=args.force)
    if args.json:
        print(json.dumps({**result.to_dict(), "repair": {**repaired.to_dict(), "output": args.fix if
                                                          repaired.check.verdict != "fail" else None}}, indent=2, default=str))
    else:
        print(repaired.render())
        print(f"wrote {args.fix}" if repaired.check.verdict != "fail" else
              f"FAIL: the repaired model still fails, {args.fix} not written: {repaired.check.reason}")
    return 0 if repaired.passed else 1

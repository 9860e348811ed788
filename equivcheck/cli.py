"""``equivcheck`` command line: a thin argument layer over the library.

A user error prints one line, ``equivcheck: error: ...``, and exits 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from equivcheck.errors import EquivcheckError, UsageError
from equivcheck.specs import Shape

EXIT_FAIL = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _ints(text: str) -> tuple[int, ...]:
    """``"7,7"`` or ``"7x7"``: non-negative integers, nothing else (``"4,x"`` and ``"4,,5"`` are refused)."""
    if not re.fullmatch(r"\s*[0-9]+(\s*[,x]\s*[0-9]+)*\s*", text):  # [0-9]: no other script's digits
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 7,7")
    return tuple(int(p) for p in re.split(r"[,x]", text))


def _seed(text: str) -> int:
    """A non-negative integer seed."""
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer seed, e.g. 0")
    return int(text)


def _count(text: str) -> int:
    """An integer in plain ASCII digits (``int`` would take ``1_000``, `` 3`` and other scripts' digits);
    its range is the spec's to check, which names the field."""
    if not re.fullmatch(r"-?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}")
    return int(text)


def _padding(text: str) -> Any:
    return text if text in ("valid", "same") else _ints(text)


def _spec_flags(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The two layers and one set of shape flags; each layer takes the flags that apply to it."""
    p.add_argument("--from", dest="source", required=required, metavar="PRESET:LAYER", help="source layer, e.g. keras:dense")
    p.add_argument("--to", dest="target", required=required, metavar="PRESET:LAYER", help="target layer, e.g. torch:conv")
    p.add_argument("--channels", type=_count, metavar="C", help="channels of the feature map the layers read")
    p.add_argument("--spatial", type=_ints, metavar="H,W", help="spatial size of that map, e.g. 7,7")
    p.add_argument("--units", type=_count, metavar="N", help="output width: dense units or conv out channels")
    p.add_argument("--kernel-size", type=_ints, metavar="KH,KW",
                   help="conv kernel size; one number for every axis (default: the whole map)")
    p.add_argument("--stride", type=_ints, metavar="S", help="conv stride, one number or one per axis (default: 1)")
    p.add_argument("--dilation", type=_ints, metavar="D", help="conv dilation (default: 1)")
    p.add_argument("--padding", type=_padding, metavar="valid|same|P,P", help="conv padding (default: valid)")
    p.add_argument("--output-padding", type=_ints, metavar="P", help="transposed conv output padding (default: 0)")
    p.add_argument("--groups", type=_count, help="conv groups (default: 1)")
    p.add_argument("--multiplier", type=_count, help="depthwise channel multiplier (default: units / channels, else 1)")
    p.add_argument("--no-bias", action="store_true", help="layers without a bias")


def _sequence_flags(p: argparse.ArgumentParser) -> None:
    """Flags of recurrent (lstm, gru, rnn) and attention (mha) layers; ``--units`` is shared with the dense flags."""
    p.add_argument("--input-size", type=_count, metavar="N", help="recurrent layers (lstm, gru, rnn): input features per step")
    p.add_argument("--embed-dim", type=_count, metavar="E", help="attention layers (mha): embedding width")
    p.add_argument("--heads", type=_count, metavar="H", help="attention layers: number of heads")
    p.add_argument("--head-dim", type=_count, metavar="D", help="attention layers: width of a head (default: embed_dim / heads)")
    p.add_argument("--kv-heads", type=_count, metavar="K",
                   help="grouped-query attention (keras, llama, internlm2): key/value heads (default: heads)")
    p.add_argument("--bidirectional", action="store_true", help="recurrent layers: bidirectional")
    p.add_argument("--reset-after", choices=("true", "false"), help="keras:gru reset_after / onnx:gru linear_before_reset")


def _is_sequence(args: argparse.Namespace) -> bool:
    from equivcheck.sequence.presets import is_sequence_name

    return is_sequence_name(args.source) or is_sequence_name(args.target)


def _sequence_specs(args: argparse.Namespace) -> tuple[Any, Any]:
    from equivcheck.sequence.presets import spec_from_flags

    return spec_from_flags(args.source, vars(args)), spec_from_flags(args.target, vars(args))


def _one_or_tuple(values: tuple[int, ...] | None) -> Any:
    return values[0] if values is not None and len(values) == 1 else values


def shape_from_args(args: argparse.Namespace) -> Shape:
    """The shape flags that were given, as one :class:`~equivcheck.specs.Shape` for both layers."""
    return Shape(
        channels=args.channels, spatial=args.spatial, units=args.units, kernel_size=_one_or_tuple(args.kernel_size),
        stride=_one_or_tuple(args.stride), dilation=_one_or_tuple(args.dilation), padding=args.padding,
        output_padding=_one_or_tuple(args.output_padding), groups=args.groups, multiplier=args.multiplier,
        bias=False if args.no_bias else None,
    )


def specs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (source, target) specs named by ``--from``/``--to`` and the shape flags."""
    from equivcheck.presets import build_pair

    if args.channels is None:
        raise UsageError("--channels is required: the number of channels of the map the layers read")
    return build_pair(args.source, args.target, shape_from_args(args))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands ------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from equivcheck.planning import plan
    from equivcheck.sequence import presets as sequence_presets

    if sequence_presets.is_sequence_name(args.source) or sequence_presets.is_sequence_name(args.target):
        return _plan_sequence(args)
    src, dst = specs_from_args(args)
    m = plan(src, dst)
    code = {lang: m.code(lang) for lang in ("numpy", "torch", "einops")}
    if args.json:
        _print_json({"source": src.describe(), "target": dst.describe(), **m.to_dict(), "code": code,
                     "bias": "copied" if src.bias and dst.bias else "zeros" if dst.bias else "none"})
        return 0
    print(f"from  {src.describe()}")
    print(f"to    {dst.describe()}")
    print(f"kernel {src.kernel_shape} -> {dst.kernel_shape}")
    for lang, text in code.items():
        print(f"{lang:7s} {text}")
    return 0


def _plan_sequence(args: argparse.Namespace) -> int:
    """``plan`` for recurrent and attention layers: one line of code per target tensor."""
    from equivcheck.planning import plan
    from equivcheck.sequence.presets import spec_from_flags

    src, dst = (spec_from_flags(name, vars(args)) for name in (args.source, args.target))
    m = plan(src, dst)
    code = {lang: m.code(lang) for lang in ("numpy", "torch", "einops")}
    if args.json:
        _print_json({"source": src.describe(), "target": dst.describe(), "code": code})
        return 0
    print(f"from  {src.describe()}\nto    {dst.describe()}")
    for lang, text in code.items():
        print(f"# {lang}\n{text}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from equivcheck.files import convert_file

    if _is_sequence(args):  # named tensors: the file's keys are the source framework's parameter names
        from equivcheck.sequence.files import convert_named_file

        src, dst = _sequence_specs(args)
        written = convert_named_file(src, dst, args.input, args.output, force=args.force)
        print(f"wrote {args.output} ({', '.join(written)})")
        return 0
    src, dst = specs_from_args(args)
    convert_file(src, dst, args.input, args.output, force=args.force, kernel_key=args.kernel_key, bias_key=args.bias_key)
    print(f"wrote {args.output}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from equivcheck.presets import PRESETS

    if args.markdown:
        from equivcheck.report.presets_table import presets_markdown

        print(presets_markdown(), end="")
        return 0
    for p in PRESETS.values():
        print(f"{p.name:9s} {', '.join(p.layers()):38s} {p.summary}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from equivcheck import backends

    names = _backend_names(args.backends) if args.backends else list(backends.BACKENDS)
    if args.facts:
        return _print_facts(names, args.json)
    rows = []
    for name in names:
        b = backends.get(name)
        ok = b.available()
        rows.append({"name": name, "module": b.module, "available": ok, "version": b.installed_version() if ok else None})
    if args.json:
        _print_json(rows)
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:{width}s} {'yes' if r['available'] else 'no ':4s} {r['version'] or '-'}")
    return 0


def _backend_names(text: str) -> list[str]:
    from equivcheck import backends

    names = [n for n in text.split(",") if n]
    for n in names:
        backends.get(n)  # an unknown name is one line naming the known ones
    return names


def _print_facts(names: list[str], as_json: bool) -> int:
    """What the probes find on this machine: each installed backend × layer kind × dtype."""
    from equivcheck import backends
    from equivcheck.backends.probe import cpu_flags, layer_kinds, probe

    rows = []
    for name in names:
        if not backends.get(name).available():
            continue
        for kind, spec in layer_kinds(name).items():
            for dtype in ("float32", "float16", "bfloat16", "float64"):
                rows.append({"kind": kind, **probe(name, spec, dtype).to_dict()})
    if as_json:
        _print_json({"cpu": cpu_flags(), "facts": rows})
        return 0
    print(f"facts probed on this machine ({cpu_flags()}):")
    width = max((len(r["backend"]) for r in rows), default=7)
    for r in rows:
        if r["runs"]:
            what = f"sums in {r['accumulate']}, rounded {'once' if r['roundings'] == 1 else 'twice'}"
            what += "" if r["decided"] else f" (undecided: {r['note']})"
        else:
            what = f"does not run: {r['reason']}"
        print(f"{r['backend']:{width}s} {r['kind']:17s} {r['dtype']:9s} {what}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Each layer on its own framework (a row per dtype), plus a row per ``--backends`` name running both layers."""
    from equivcheck import backends
    from equivcheck.checker import resolve_backend
    from equivcheck.verification import verify_pair

    if _is_sequence(args):
        return _verify_sequence(args)
    src, dst = specs_from_args(args)
    extra = [b for b in (args.backends or "").split(",") if b]
    for name in extra:
        backends.get(name)  # an unknown name: one line naming the known ones
    rows = []
    for dtype in [d for d in args.dtype.split(",") if d]:
        (sb, s_note), (tb, t_note) = resolve_backend(src, dtype), resolve_backend(dst, dtype)
        rows.append((sb, tb, dtype, [n for n in (s_note, t_note) if n]))
        rows += [(b, b, dtype, [f"both layers on {b} (--backends)"]) for b in extra if (b, b) != (sb, tb)]
    cases = []
    for i, (sb, tb, dtype, notes) in enumerate(rows, 1):
        if sys.stderr.isatty() and not args.json:
            print(f"\r[{i}/{len(rows)}] {sb} → {tb} {dtype} …", end="", file=sys.stderr, flush=True)
        case = verify_pair(src, dst, source_backend=sb, target_backend=tb, dtype=dtype, seed=args.seed)
        case.notes[:0] = notes
        cases.append(case)
    if sys.stderr.isatty() and not args.json:
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        _print_json({"cases": [c.to_dict() for c in cases]})
    else:
        from equivcheck.report.terminal import print_cases

        print_cases(cases)
        counts = {v: sum(c.verdict == v for c in cases) for v in ("pass", "fail", "inconclusive", "skip", "error")}
        print(f"{len(cases)} case{'s' if len(cases) != 1 else ''}: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    if args.report:
        from equivcheck.report import write_report

        paths = write_report(args.report, cases, seed=args.seed, command="verify")
        if not args.json:
            print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(c.verdict in ("pass", "skip") for c in cases) else EXIT_FAIL


def _verify_sequence(args: argparse.Namespace) -> int:
    """``verify`` for recurrent and attention layers: each layer on its own framework, a row per dtype."""
    from equivcheck.sequence.verify import resolve_backend
    from equivcheck.verification import verify_pair

    src, dst = _sequence_specs(args)
    if args.backends:
        raise UsageError("--backends does not apply to recurrent or attention layers: each runs on its own framework")
    cases = []
    for dtype in [d for d in args.dtype.split(",") if d]:
        (sb, s_note), (tb, t_note) = resolve_backend(src, dtype), resolve_backend(dst, dtype)
        case = verify_pair(src, dst, source_backend=sb, target_backend=tb, dtype=dtype, seed=args.seed)
        case.notes[:0] = [n for n in (s_note, t_note) if n]
        cases.append(case)
    if args.json:
        _print_json({"cases": [c.to_dict() for c in cases]})
    else:
        print(f"from  {src.describe()}\nto    {dst.describe()}")
        for c in cases:
            rejected = sum(m.outcome == "rejected" for m in c.mutations)
            print(f"{c.verdict:12s} {c.source_backend} → {c.target_backend} {c.dtype:8s} mutants rejected "
                  f"{rejected}/{len(c.mutations)}: {'; '.join(x for x in (c.reason, *c.notes) if x)}")
    if args.report:
        from equivcheck.report import write_report

        paths = write_report(args.report, cases, seed=args.seed, command="verify")
        if not args.json:
            print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(c.verdict in ("pass", "skip") for c in cases) else EXIT_FAIL


def _explore_side(preset: str | None, obj: str | None, role: str, flag: str, obj_flag: str) -> Any:
    """A preset name (built by explore, which borrows units from a real layer on the other side) or an object."""
    if preset and obj:
        raise UsageError(f"{flag} and {obj_flag} both name the {role}: give one")
    if not preset and not obj:
        raise UsageError(f"the {role} is missing: pass {flag} PRESET:LAYER, or {obj_flag} MODULE:ATTR or MODEL.onnx[:NODE] or MODEL.tflite")
    if obj:
        from equivcheck.exploration.objects import load_object
        from equivcheck.exploration.runtimes import split_model_path

        # MODEL.onnx[:NODE] / MODEL.tflite go to explore as the path; anything else is MODULE:ATTR
        return obj if split_model_path(obj) else load_object(obj)
    return preset


def cmd_explore(args: argparse.Namespace) -> int:
    """Print the exploration (or one JSON object); ``--report DIR`` writes the standard report files there."""
    from equivcheck.exploration import explore

    source = _explore_side(args.source, args.source_obj, "source", "--from", "--source")
    from equivcheck.sequence.explore import is_recurrent_object
    from equivcheck.sequence.head_layout import is_attention_object

    # a recurrent or attention layer alone: its gate order or head layout, against its own preset
    if (is_recurrent_object(source) or is_attention_object(source)) and not (args.target or args.target_obj):
        target = None
    else:
        target = _explore_side(args.target, args.target_obj, "target", "--to", "--target")
    shape = shape_from_args(args).given()
    result = explore(source, target, seed=args.seed, backend=args.backend, probe=args.probe, **shape)
    data = result.to_dict()
    if args.json:
        _print_json(data)
    else:
        print(result.render())
    if args.report:
        from equivcheck.report import write_report

        paths = write_report(args.report, [], seed=args.seed, command="explore",
                             extra={"explorations": [json.loads(json.dumps(data, default=str))]})
        if not args.json:
            print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if result.found else EXIT_FAIL


def cmd_report(args: argparse.Namespace) -> int:
    from equivcheck.report import rebuild

    for path in rebuild(args.json_path, args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from equivcheck.demo import run

    return run(report_dir=args.report, quick=args.quick)


def cmd_convolutionalize(args: argparse.Namespace) -> int:
    from equivcheck.fcn.commands import convolutionalize_file

    convolutionalize_file(args.input, args.output, force=args.force)
    print(f"wrote {args.output}")
    return 0


def cmd_check_models(args: argparse.Namespace) -> int:
    from equivcheck.modelcheck.commands import cmd_check_models as run

    return run(args)


def _shape(text: str) -> tuple[int, ...]:
    """A shape with the batch axis first, e.g. ``2,3,224,224``."""
    shape = _ints(text)
    if len(shape) < 2 or 0 in shape:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape with a batch axis first, e.g. 2,3,224,224")
    return shape


def cmd_verify_model(args: argparse.Namespace) -> int:
    from equivcheck.fcn.commands import verify_model_cli

    return verify_model_cli(args)


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="equivcheck", description="Verify and explore dense <-> conv weight conversions.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("plan", cmd_plan, "print the weight mapping between two layers and its code")
    _spec_flags(p)
    _sequence_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    formats = ".npz/.npy/.safetensors/.pt/.h5/.keras/.onnx/.tflite"
    p = add("convert", cmd_convert, f"convert the weights in a {formats} file (written atomically)")
    _spec_flags(p)
    _sequence_flags(p)
    p.add_argument("input", metavar="IN", help=f"weights to read: {formats} (models are read, never run)")
    p.add_argument("output", metavar="OUT", help="where to write the converted weights: .npz, .npy (no bias), .safetensors or .pt/.pth")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--kernel-key", default=None, help="name of the kernel array in IN (default: guessed; in .onnx/.tflite/.keras: the one linear node's weight)")
    p.add_argument("--bias-key", default=None, help="name of the bias array in IN (default: guessed; in .onnx/.tflite/.keras: the one linear node's bias)")

    p = add("presets", cmd_presets, "list the presets and their layers")
    p.add_argument("--markdown", action="store_true", help="print docs/presets.md")

    p = add("backends", cmd_backends, "list the backends and whether their framework is installed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--facts", action="store_true",
                   help="probe each layer kind in each dtype on this machine: runs or not, roundings, accumulation")
    p.add_argument("--backends", default=None, help="comma-separated backends to list (default: all)")

    p = add("verify", cmd_verify, "convert with the planner and check the real layers agree")
    _spec_flags(p)
    _sequence_flags(p)
    p.add_argument("--backends", default=None, metavar="NAMES",
                   help="comma-separated backends that also run both layers, a row each (default: none; each layer "
                        "always runs on its own preset's framework, e.g. keras -> torch)")
    p.add_argument("--dtype", default="float32", help="comma-separated: float64,float32,float16,bfloat16 (default: float32)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the weights and inputs (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html to DIR")

    p = add("explore", cmd_explore, "discover the weight mapping between two black-box layers")
    _spec_flags(p, required=False)
    objects = "a layer or callable to probe (MODULE:ATTR), or an exported model: MODEL.onnx[:NODE] or MODEL.tflite"
    p.add_argument("--source", dest="source_obj", metavar="OBJECT", help=objects)
    p.add_argument("--target", dest="target_obj", metavar="OBJECT", help=objects)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html to DIR")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--backend", help="run preset sides on this backend (default: the preset's own framework)")
    p.add_argument("--probe", choices=("auto", "lines", "selectors"), default="auto",
                   help="probing scheme (auto: selectors for wide layers)")

    p = add("report", cmd_report, "rebuild the Markdown and HTML report from equivcheck.json")
    p.add_argument("json_path", metavar="JSON")
    p.add_argument("--out", metavar="DIR", help="where to write (default: beside the JSON)")

    p = add("demo", cmd_demo, "the motivating case end to end: plans, verification, VGG16, reports")
    p.add_argument("--report", metavar="DIR", default="reports")
    p.add_argument("--quick", action="store_true", help="small unpadded VGG-style models instead of VGG16 (seconds, not a minute)")

    p = add("convolutionalize", cmd_convolutionalize, "turn a classifier's Flatten+Dense head into convs (file to file)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")

    p = add("verify-model", cmd_verify_model, "check a convolutionalized model against its source model")
    p.add_argument("original", metavar="SOURCE", help="the classifier model file (.keras, or a torch state dict)")
    p.add_argument("converted", metavar="CONVERTED", help="its convolutionalized version")
    p.add_argument("--size", type=_ints, help="larger input size H,W to check sliding-window equivalence at "
                   "(default: the training size + the total stride: a 2x2 output map)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html to DIR")

    text = "check a converted model against its source layer by layer: the first wrong layer, its mistake and the fix"
    p = add("check-models", cmd_check_models, text)
    p.add_argument("source", metavar="SRC", help=".keras, .onnx or .tflite model, or torch state dict (with --model)")
    p.add_argument("converted", metavar="DST", help=".keras, .onnx or .tflite model, or torch state dict (with --model)")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="the source model's input, batch first (default: what a model records)")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="builds the torch architecture for a state-dict file")
    p.add_argument("--dtype", default="float32", help="comma-separated dtypes to run in (torch and Keras models are cast)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the designed inputs (default: 0)")
    p.add_argument("--no-mutants", action="store_true", help="skip showing the data rejects each plausible mistake")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html and modelcheck.md to DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fix", metavar="OUT", help="write DST repaired (failing layers' weights from SRC through the right "
                   "mapping) to OUT, in DST's format; exit 0 only when the repaired model passes")
    p.add_argument("--force", action="store_true", help="replace an existing --fix OUT")
    return parser


def _version() -> str:
    from equivcheck.version import __version__

    return f"equivcheck {__version__}"


class _OutputError(EquivcheckError):
    """Standard output could not be written (a full device, a closed pipe)."""


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a write error becomes an :class:`_OutputError` (one line, exit 2),
    and a character the stream cannot encode (a file name that is not UTF-8) is written escaped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stream, "encoding", None) or "utf-8"
            return self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except OSError as exc:
            raise _OutputError(_output_failed(exc)) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise _OutputError(_output_failed(exc)) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _output_failed(exc: OSError) -> str:
    import errno

    hint = "; free space or write somewhere else" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return f"standard output cannot be written ({exc.strerror or exc}): its output is incomplete{hint}"


def _drop_pending_output(stream: Any) -> None:
    """Point the failed stream's descriptor at /dev/null, so the interpreter's last flush cannot fail again."""
    import os

    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        return
    os.dup2(null, fd)
    os.close(null)


def _check_argv(argv: Sequence[str]) -> None:
    """Refuse, before any work, an argument that is not valid UTF-8 (a file name in another encoding)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument {arg!r} is not valid UTF-8 (a file name in another encoding?): rename the file "
                             "or link it under a UTF-8 name") from None
        except AttributeError:
            pass


def _one_line_warnings(shown: Callable[..., Any]) -> Callable[..., Any]:
    """``warnings.showwarning`` for a command: equivcheck's own warnings as one line, ``equivcheck: warning: ...``
    (no file name, no source line); any other warning as before."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not category.__module__.startswith("equivcheck"):
            return shown(message, category, filename, lineno, file, line)
        text = str(message).splitlines()[0] if str(message) else category.__name__
        print(f"equivcheck: warning: {text}", file=sys.stderr if file is None else file)
        return None

    return show


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    stdout, shown = sys.stdout, warnings.showwarning
    guarded = sys.stdout = _GuardedStdout(stdout)
    warnings.showwarning = _one_line_warnings(shown)
    try:
        _check_argv(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        code = args.func(args)
        sys.stdout.flush()
        return code
    except EquivcheckError as exc:
        if isinstance(exc, _OutputError):
            _drop_pending_output(stdout)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"equivcheck: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("equivcheck: interrupted", file=sys.stderr)
        return 130
    finally:
        if sys.stdout is guarded:
            sys.stdout = stdout
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

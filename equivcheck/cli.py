"""``equivcheck`` command line: a thin argument layer over the library.

A user error prints one line, ``equivcheck: error: ...``, and exits 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from equivcheck.errors import EquivcheckError

EXIT_FAIL = 1
EXIT_USAGE = 2


class UsageError(EquivcheckError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _ints(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 7,7") from None


def _padding(text: str) -> Any:
    return text if text in ("valid", "same") else _ints(text)


def _spec_flags(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--from", dest="source", required=required, metavar="PRESET:LAYER", help="source layer, e.g. keras:dense")
    p.add_argument("--to", dest="target", required=required, metavar="PRESET:LAYER", help="target layer, e.g. torch:conv")
    p.add_argument("--channels", type=int, metavar="C", help="channels of the feature map the layers read")
    p.add_argument("--spatial", type=_ints, default=(), metavar="H,W", help="spatial size of that map, e.g. 7,7")
    p.add_argument("--units", type=int, metavar="N", help="output width: dense units or conv out channels")
    p.add_argument("--kernel-size", type=_ints, metavar="KH,KW", help="conv kernel size (default: the whole map)")
    p.add_argument("--stride", type=_ints, default=(1,), metavar="S")
    p.add_argument("--dilation", type=_ints, default=(1,), metavar="D")
    p.add_argument("--padding", type=_padding, default="valid", metavar="valid|same|P,P")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--multiplier", type=int, help="depthwise channel multiplier")
    p.add_argument("--no-bias", action="store_true", help="layers without a bias")


def _one_or_tuple(values: tuple[int, ...]) -> Any:
    return values[0] if len(values) == 1 else values


def specs_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (source, target) specs named by ``--from``/``--to`` and the shape flags."""
    from equivcheck.presets import spec

    if args.channels is None:
        raise UsageError("--channels is required: the number of channels of the map the layers read")
    common = dict(channels=args.channels, spatial=args.spatial, units=args.units, bias=not args.no_bias)
    conv = dict(kernel_size=args.kernel_size, stride=_one_or_tuple(args.stride),
                dilation=_one_or_tuple(args.dilation), padding=args.padding)
    out = []
    for name in (args.source, args.target):
        layer = name.split(":")[-1]
        if layer == "dense":
            out.append(spec(name, **common))
        elif layer == "depthwise":
            out.append(spec(name, **common, **conv, multiplier=args.multiplier))
        else:
            out.append(spec(name, **common, **conv, groups=args.groups))
    return out[0], out[1]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands ------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from equivcheck.plan import plan

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


def cmd_convert(args: argparse.Namespace) -> int:
    from equivcheck.files import convert_file

    src, dst = specs_from_args(args)
    convert_file(src, dst, args.input, args.output, force=args.force, kernel_key=args.kernel_key, bias_key=args.bias_key)
    print(f"wrote {args.output}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from equivcheck.presets import PRESETS

    if args.markdown:
        from equivcheck.render import presets_markdown

        print(presets_markdown(), end="")
        return 0
    for p in PRESETS.values():
        print(f"{p.name:9s} {', '.join(p.layers()):38s} {p.summary}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from equivcheck import backends

    rows = []
    for name in backends.BACKENDS:
        b = backends.get(name)
        ok = b.available()
        rows.append({"name": name, "module": b.module, "available": ok, "version": b.version() if ok else None})
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:8s} {'yes' if r['available'] else 'no ':4s} {r['version'] or '-'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from equivcheck.verify import verify

    src, dst = specs_from_args(args)
    names = [b for b in args.backends.split(",") if b] if args.backends else ["numpy"]
    cases = verify(src, dst, backends=names, dtypes=args.dtype.split(","), seed=args.seed)
    if args.report:
        from equivcheck.report import write_report

        write_report(args.report, cases, seed=args.seed, command="verify")
    if args.json:
        _print_json({"cases": [c.to_dict() for c in cases]})
    else:
        from equivcheck.render import print_cases

        print_cases(cases)
    return 0 if all(c.verdict in ("pass", "skip") for c in cases) else EXIT_FAIL


def cmd_explore(args: argparse.Namespace) -> int:
    from equivcheck.explore import explore_cli

    return explore_cli(args)


def cmd_report(args: argparse.Namespace) -> int:
    from equivcheck.report import rebuild

    for path in rebuild(args.json_path, args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from equivcheck.demo import run

    return run(report_dir=args.report, quick=args.quick)


def cmd_convolutionalize(args: argparse.Namespace) -> int:
    from equivcheck.models import convolutionalize_file

    convolutionalize_file(args.input, args.output, force=args.force)
    print(f"wrote {args.output}")
    return 0


def cmd_verify_model(args: argparse.Namespace) -> int:
    from equivcheck.models import verify_model_cli

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
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("convert", cmd_convert, "convert the weights in a .npz/.npy file (written atomically)")
    _spec_flags(p)
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--kernel-key", default=None, help="name of the kernel array in IN (default: guessed)")
    p.add_argument("--bias-key", default=None, help="name of the bias array in IN (default: guessed)")

    p = add("presets", cmd_presets, "list the presets and their layers")
    p.add_argument("--markdown", action="store_true", help="print docs/presets.md")

    p = add("backends", cmd_backends, "list the backends and whether their framework is installed")
    p.add_argument("--json", action="store_true")

    p = add("verify", cmd_verify, "convert with the planner and check the real layers agree")
    _spec_flags(p)
    p.add_argument("--backends", default="numpy", help="comma-separated, e.g. numpy,torch,keras")
    p.add_argument("--dtype", default="float32", help="comma-separated: float64,float32,float16,bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html to DIR")

    p = add("explore", cmd_explore, "discover the weight mapping between two black-box layers")
    _spec_flags(p, required=False)
    p.add_argument("--source", dest="source_obj", metavar="MODULE:ATTR", help="a layer or callable to probe")
    p.add_argument("--target", dest="target_obj", metavar="MODULE:ATTR", help="a layer or callable to probe")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", metavar="DIR", help="write equivcheck.json/.md/.html to DIR")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--force", action="store_true")

    p = add("verify-model", cmd_verify_model, "check a convolutionalized model against the original")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("converted", metavar="CONVERTED")
    p.add_argument("--size", type=_ints, help="larger input size to check sliding-window equivalence at")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", metavar="DIR")
    return parser


def _version() -> str:
    from equivcheck import __version__

    return f"equivcheck {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return args.func(args)
    except EquivcheckError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"equivcheck: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("equivcheck: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``equivcheck explore``: the command-line face of :func:`equivcheck.explore`.

Each side is ``--from/--to PRESET:LAYER`` (built at the shape flags) or
``--source/--target MODULE:ATTR`` (a layer object or callable). Prints the exploration, or
one JSON object with ``--json``; ``--report DIR`` also writes ``explore.json`` and
``explore.md`` there atomically. Exit 0 when a mapping is found, 1 when none exists.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

from equivcheck.errors import SpecError

__all__ = ["run"]


def _side(args: argparse.Namespace, preset: str | None, obj: str | None, role: str, flag: str, obj_flag: str) -> Any:
    if preset and obj:
        raise SpecError(f"{flag} and {obj_flag} both name the {role}: give one")
    if not preset and not obj:
        raise SpecError(f"the {role} is missing: pass {flag} PRESET:LAYER or {obj_flag} MODULE:ATTR")
    if obj:
        from equivcheck.explore.sides import load_object

        return load_object(obj)
    from equivcheck.cli import specs_from_args

    one = copy.copy(args)
    one.source = one.target = preset
    return specs_from_args(one)[0]


def _shape_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    def one(values: Any) -> Any:
        return values[0] if isinstance(values, tuple) and len(values) == 1 else values

    return dict(
        channels=args.channels, spatial=tuple(args.spatial) or None, units=args.units, kernel_size=args.kernel_size,
        stride=one(args.stride), dilation=one(args.dilation), padding=args.padding, groups=args.groups,
        multiplier=args.multiplier, bias=not args.no_bias,
    )


def run(args: argparse.Namespace) -> int:
    from equivcheck.explore import explore

    source = _side(args, args.source, getattr(args, "source_obj", None), "source", "--from", "--source")
    target = _side(args, args.target, getattr(args, "target_obj", None), "target", "--to", "--target")
    result = explore(source, target, seed=getattr(args, "seed", 0), backend=getattr(args, "backend", None),
                     probe=getattr(args, "probe", "auto"), **_shape_kwargs(args))
    data = result.to_dict()
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(result.render())
    report = getattr(args, "report", None)
    if report:
        from equivcheck.report import write_report

        paths = write_report(report, [], seed=getattr(args, "seed", 0), command="explore",
                             extra={"explorations": [json.loads(json.dumps(data, default=str))]})
        if not getattr(args, "json", False):
            print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if result.found else 1

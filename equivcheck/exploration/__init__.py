"""Explore: find, by probing, the weight mapping under which two linear layers agree.

    >>> import equivcheck as ec
    >>> r = ec.explore("keras:dense", "torch:conv", channels=512, spatial=(7, 7), units=4096)
    >>> r.code["numpy"]
    'w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)'

Each side is probed on its own (:mod:`equivcheck.exploration.probe`) for the mapping from its
stored kernel to the canonical ``(out, in, *k)`` tensor; the pair's mapping is the source's
followed by the inverse of the target's. It is then named in terms of conventions
(:mod:`~equivcheck.exploration.conventions`) and checked on random data
(:mod:`~equivcheck.exploration.check`). See ``docs/explore.md``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from equivcheck.backends.base import IMPORT_SECONDS
from equivcheck.errors import SpecError
from equivcheck.exploration.check import Verification, nearest_candidate, verify_mapping
from equivcheck.exploration.conventions import candidates, convention_rows, holding, matching_presets
from equivcheck.exploration.objects import make_side
from equivcheck.exploration.probe import STRATEGIES, Probed, probe_side
from equivcheck.exploration.result import Exploration, SideReport
from equivcheck.exploration.sides import BlackBox, Side
from equivcheck.mapping import Mapping
from equivcheck.specs import ConvSpec, Shape

__all__ = ["BlackBox", "Exploration", "Probed", "explore", "pair_mapping", "probe_layer"]


def _shape(channels: int | None, spatial: Any, units: int | None, kernel_size: Any, stride: Any, dilation: Any,
           padding: Any, groups: int, multiplier: int | None, bias: bool, output_padding: Any = 0) -> Shape:
    def tup(v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        return (v,) if isinstance(v, int) else tuple(v)

    def one(v: Any) -> Any:
        v = tup(v)
        return v[0] if isinstance(v, tuple) and len(v) == 1 else v

    return Shape(channels=channels, spatial=tup(spatial), units=units, kernel_size=tup(kernel_size), stride=one(stride),
                 dilation=one(dilation), padding=one(padding) if not isinstance(padding, str) else padding,
                 groups=groups, multiplier=multiplier, bias=bias, output_padding=one(output_padding))


def probe_layer(layer: Any, *, channels: int | None = None, spatial: Any = None, units: int | None = None,
          kernel_size: Any = None, stride: Any = 1, dilation: Any = 1, padding: Any = "valid", groups: int = 1,
          multiplier: int | None = None, bias: bool = True, backend: str | None = None,
          strategy: str = "auto") -> Probed:
    """Probe one layer: ``.canonical`` is the mapping from its stored kernel to ``(out, in, *k)``."""
    shape = _shape(channels, spatial, units, kernel_size, stride, dilation, padding, groups, multiplier, bias)
    return probe_side(make_side(layer, shape, backend), strategy)


def pair_mapping(source: Probed, target: Probed) -> Mapping:
    """Source kernel → target kernel: the source's canonical mapping, then the inverse of the target's."""
    if source.canonical is None or target.canonical is None:
        raise SpecError("pair_mapping needs two sides that probed as rearranged linear layers")
    return source.canonical.then(target.canonical.inverse()).simplify()


def _axis_names(cands: list, held: list[bool]) -> str | None:
    """A side's stored kernel axis names from a holding layout (``"io"``, ``"oihw"``): einops code reads them."""
    for c, h in zip(cands, held):
        values = dict(c.values)
        layout = values.get("kernel layout") or values.get("kernel orientation")
        if h and layout:
            return layout.lower()
    return None


def _make_sides(source: Any, target: Any, shape: Shape, backend: str | None) -> list[Side]:
    """Both sides; a layer that knows its map lends channels, spatial and units to a preset name on the other side."""
    from dataclasses import replace

    from equivcheck.exploration.objects import is_preset_name

    objs = [source, target]
    named = [isinstance(o, str) and is_preset_name(o) for o in objs]
    sides: list[Side | None] = [None, None]
    for i in sorted(range(2), key=lambda i: named[i]):
        lend = shape
        other = sides[1 - i]
        if named[i] and other is not None:
            g = other.geometry
            lend = replace(
                shape,
                channels=shape.channels if shape.channels is not None else g.in_channels,
                spatial=shape.spatial if shape.spatial is not None else (() if other.rank0 else g.spatial),
                units=shape.units if shape.units is not None else g.out_channels,
            )
        sides[i] = make_side(objs[i], lend, backend)
    return [s for s in sides if s is not None]


def _geometry_mismatch(a: ConvSpec, b: ConvSpec) -> list[str]:
    """Why two sides cannot compute the same function whatever their weights, as phrases."""

    def eff(g: ConvSpec) -> dict[str, Any]:
        return {
            "in channels": g.in_channels,
            "out channels": g.out_channels,
            "groups": g.groups,
            "transposed": g.transposed,
            "kernel size (receptive field)": g.kernel_size,
            "input map": g.spatial,
            "padding": g.pads(),
            "output map": g.output_spatial,
            "stride": tuple(s if o > 1 else 1 for s, o in zip(g.stride, g.output_spatial)),
            "dilation": tuple(d if k > 1 else 1 for d, k in zip(g.dilation, g.kernel_size)),
        }

    ea, eb = eff(a), eff(b)
    return [f"{k} differs: source {ea[k]}, target {eb[k]}" for k in ea if ea[k] != eb[k]]


def _bias_reason(src: Probed, dst: Probed) -> tuple[str, str]:
    """(reason it cannot carry over or "", how the bias carries over)."""
    for role, p in (("source", src), ("target", dst)):
        if p.bias == "fixed offset":
            return f"the {role} adds a fixed offset that is not a settable bias: no weights can match it", ""
        if p.bias == "not a plain bias":
            return f"the {role}'s bias does not reach its output unchanged (scaled or mixed)", ""
    s, t = src.side.has_bias, dst.side.has_bias
    if s and not t:
        return "the source has a bias and the target none: only a zero bias converts", ""
    if t and not s:
        return "", "the target's bias is zero (the source has none)"
    return "", "copied unchanged (one value per output channel)" if s else "none on either side"


def explore(
    source: Any,
    target: Any,
    *,
    channels: int | None = None,
    spatial: Any = None,
    units: int | None = None,
    kernel_size: Any = None,
    stride: Any = 1,
    dilation: Any = 1,
    padding: Any = "valid",
    groups: int = 1,
    multiplier: int | None = None,
    bias: bool = True,
    output_padding: Any = 0,
    backend: str | None = None,
    seed: int = 0,
    probe: str = "auto",
) -> Exploration:
    """Find the mapping that makes ``target`` compute what ``source`` does, by probing both.

    ``source``/``target``: a preset name (``"keras:dense"``, built at the given shape on its
    framework's backend, or on ``backend=``), a spec, a backend layer, a torch ``nn.Module``
    (``nn.Linear``, ``nn.Conv2d``, ``nn.Sequential(nn.Flatten(), nn.Linear(...))``), a Keras
    layer or model, a :class:`BlackBox`, a callable ``fn(x, kernel, bias)`` carrying
    ``kernel_shape``, or ``"module:attr"`` naming one; an exported model: an ONNX ``ModelProto``,
    ``.onnx`` path or ``InferenceSession`` (one linear node, or ``(model, "NODE")`` /
    ``"model.onnx:NODE"``), TFLite bytes or a ``.tflite`` path (:mod:`equivcheck.exploration.runtimes`).
    Shape keywords fill in what a layer does
    not carry (a torch ``Linear`` does not know the map it reads: ``channels=512,
    spatial=(7, 7)``). ``probe`` picks the strategy: ``"auto"``, ``"lines"`` or ``"selectors"``.
    Never raises because no mapping exists: the result says ``found=False`` and why.
    ``seconds`` on the result leaves out importing frameworks (``import_seconds``).
    A recurrent layer on either side (``nn.LSTM``, a Keras ``GRU``, a ``RecurrentBlackBox``, ``"keras:lstm"``):
    its gate order, found by probing (:func:`equivcheck.sequence.explore.explore_recurrent`). An attention
    layer (``nn.MultiheadAttention``, a built Keras ``MultiHeadAttention``, an ``AttentionBlackBox``,
    ``"torch:mha"``): its q/k/v order, fused layout, head split, heads count and output orientation
    (:func:`equivcheck.sequence.head_layout.explore_attention`). ``target=None`` for either: the source's own preset.
    """
    from equivcheck.sequence.explore import explore_recurrent, is_recurrent_object
    from equivcheck.sequence.head_layout import explore_attention, is_attention_object

    if is_attention_object(source) or is_attention_object(target):
        return explore_attention(source, target, seed=seed)
    if is_recurrent_object(source) or is_recurrent_object(target):
        return explore_recurrent(source, target, seed=seed)
    if probe not in STRATEGIES:
        raise SpecError(f"probe={probe!r} is not valid: expected one of {', '.join(STRATEGIES)}")
    start = time.perf_counter()
    imported = dict(IMPORT_SECONDS)
    shape = _shape(channels, spatial, units, kernel_size, stride, dilation, padding, groups, multiplier, bias,
                   output_padding)
    sides = _make_sides(source, target, shape, backend)
    try:
        result = _explore_sides(sides, probe, seed)
    finally:
        for side in sides:
            side.release()  # a VGG fc6 side holds a 411 MB buffer: not kept alive by the result
    result.imports = {name: s for name, s in IMPORT_SECONDS.items() if name not in imported}
    result.seconds = time.perf_counter() - start - sum(result.imports.values())
    return result


def _explore_sides(sides: list[Side], probe: str, seed: int) -> Exploration:
    sides[1].share_scratch(sides[0])  # one kernel-sized buffer, not two: memory is the cost here
    probes = [probe_side(side, probe) for side in sides]
    src, dst = probes
    cands = [candidates(side) for side in sides]
    holds = [holding(p.side, p.canonical, c) if p.ok else [False] * len(c) for p, c in zip(probes, cands)]
    rows = [row for role, side, c, h in zip(("source", "target"), sides, cands, holds)
            for row in convention_rows(role, side, c, h)]
    reports = [
        SideReport(role, p, tuple(matching_presets(p.side, p.canonical)) if p.ok else ())
        for role, p in zip(("source", "target"), probes)
    ]
    mismatch = _geometry_mismatch(sides[0].geometry, sides[1].geometry)
    mapping, verification, nearest = None, None, None
    bias_text, notes = "", []
    if mismatch:
        reason = "the layers cannot compute the same function: " + "; ".join(mismatch)
        nearest = _nearest("none: no named convention converts between kernels that act on different windows or "
                           "channels", None, None)
    elif not src.ok or not dst.ok:
        bad = src if not src.ok else dst
        role = "source" if bad is src else "target"
        reason = f"the {role} does not behave as a rearranged linear layer: {bad.failure}"
        nearest = _nearest_from_probe(probes, cands, holds, seed)
        if nearest.get("scale") is not None:
            reason = (f"the target computes {nearest['scale']:.4g} × what the source does (probe: {bad.failure}); "
                      "no rearrangement of weights fixes a scale")
    else:
        mapping = pair_mapping(src, dst).named(*(_axis_names(c, h) for c, h in zip(cands, holds)))
        why_bias, bias_text = _bias_reason(src, dst)
        verification = verify_mapping(src, dst, mapping, seed=seed)
        if why_bias:
            reason = why_bias
        elif not verification.passed:
            reason = _verification_reason(verification)
        else:
            reason = ""
        if reason:
            nearest = _nearest_named(probes, cands, holds, mapping, verification)
    found = not reason
    if found and sum(holds[0]) * sum(holds[1]) == 0:
        notes.append("the mapping verifies but no combination of named conventions describes one of the sides")
    calls = sum(side.calls for side in sides)
    return Exploration(
        found=found, reason=reason, source=reports[0], target=reports[1], mapping=mapping, conventions=rows,
        combinations=len(cands[0]) * len(cands[1]), combinations_holding=sum(holds[0]) * sum(holds[1]),
        verification=verification, nearest=nearest, forward_calls=calls, seconds=0.0,
        bias=bias_text, notes=notes,
    )


def _verification_reason(v: Verification) -> str:
    if not v.source.passed:
        return f"the source does not reproduce its own probed kernel on random data ({v.source.summary()})"
    if not v.affine:
        return "the target is not linear: target(x) + target(−x) ≠ 2·target(0) on random data"
    if v.is_scaled_copy:
        return f"the target computes {v.scale:.4g} × what the source does: no rearrangement of weights fixes a scale"
    return f"the probed mapping does not verify on random data (relative error {v.relative_error:.3g})"


def _describe(cands: list, held: list[bool]) -> str:
    named = [c for c, h in zip(cands, held) if h]
    return named[0].describe() if named else "not a named convention"


def _nearest(description: str, mapping: Mapping | None, v: Verification | None) -> dict[str, Any]:
    rel = None if v is None or not math.isfinite(v.relative_error) else v.relative_error
    return {
        "description": description,
        "code": None if mapping is None else mapping.code("numpy"),
        "relative_error": rel,
        "scale": v.scale if v is not None and v.is_scaled_copy else None,
    }


def _nearest_named(probes: list[Probed], cands: list, holds: list, mapping: Mapping, v: Verification) -> dict[str, Any]:
    return _nearest(f"source {_describe(cands[0], holds[0])} → target {_describe(cands[1], holds[1])}", mapping, v)


def _nearest_from_probe(probes: list[Probed], cands: list, holds: list, seed: int) -> dict[str, Any]:
    """For a side that did not probe as a rearrangement: its best-fitting named convention, and how far off."""
    chosen, parts = [], []
    for role, p, c, h in zip(("source", "target"), probes, cands, holds):
        if p.ok:
            chosen.append(p.canonical)
            parts.append(f"{role} {_describe(c, h)}")
            continue
        best = nearest_candidate(p, c)
        if best is None:
            return _nearest(f"none: the {role}'s responses fit no named convention", None, None)
        chosen.append(best[0].mapping)
        parts.append(f"{role} {best[0].describe()}")
    mapping = chosen[0].then(chosen[1].inverse()).simplify()
    fake = [Probed(p.side, m, p.strategy, p.calls, p.bias) for p, m in zip(probes, chosen)]
    v = verify_mapping(fake[0], fake[1], mapping, seed=seed, source_canonical=chosen[0])
    return _nearest(" → ".join(parts), mapping, v)

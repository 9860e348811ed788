"""Which conventions a converted kernel follows, from the weights alone: no forward pass.

:func:`identify` compares a converted kernel (and bias) exactly with the right conversion of the
same source weights, with each plausible mistake of :mod:`equivcheck.mutations` (one, or two
at once), and with every preset's right conversion. It serves verify's diagnosis of a failed
case, the checker's "matches torch:conv except: missing flip", and the whole-model check.
With all-distinct source weights (:func:`probe_weights`) the answer is exact; with random
weights a kernel that matches mistakes of different conventions at once is not named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, NoMapping
from equivcheck.mapping import Mapping
from equivcheck.mutations import Mutant, mutants
from equivcheck.planning import plan
from equivcheck.presets import PRESETS, spec
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

__all__ = ["Identification", "as_preset", "identify", "layer_kinds", "preset_kwargs", "probe_weights"]

#: Kernels larger than this are not identified (the comparisons would copy it once per preset and mistake).
IDENTIFY_MAX_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Identification:
    """What a converted kernel is, in terms of the right mapping, its mistakes and other presets."""

    target: str
    exact: bool = False
    mistakes: tuple[Mutant, ...] = ()  # one or two mutants whose composition reproduces the kernel
    same_as: tuple[str, ...] = ()  # other preset layers the kernel is right for
    problem: str = ""  # why nothing matched
    right: Mapping | None = field(default=None, compare=False)

    @property
    def differences(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.mistakes)

    def summary(self) -> str:
        if self.exact:
            also = f" (= {', '.join(self.same_as)})" if self.same_as else ""
            return f"matches {self.target}{also}"
        if self.mistakes:
            like = f"; it is the right kernel for {', '.join(self.same_as)}" if self.same_as else ""
            also = f"; {self.problem}" if self.problem else ""
            return f"matches {self.target} except: {', '.join(self.differences)}{also}{like}"
        if self.same_as:
            return f"follows {', '.join(self.same_as)}, not {self.target}"
        return self.problem or f"matches no catalogued convention of {self.target}"

    def diagnosis(self) -> dict[str, str] | None:
        """The single mistake, as a report's ``diagnosis``, with the right mapping as code; None otherwise."""
        if len(self.mistakes) != 1 or self.problem:
            return None
        m = self.mistakes[0]
        code = m.bias.simplify().code("numpy", var="b") if m.bias is not None else m.mapping.simplify().code("numpy")
        out = {"mutant": m.name, "convention": str(m.convention), "description": m.description, "code": code}
        if self.right is not None:
            out["right"] = self.right.simplify().code("numpy")
        return out


def probe_weights(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """All-distinct kernel ``1, 2, …`` and bias ``-1, -2, …``: where each weight went is then unambiguous."""

    def count(shape: tuple[int, ...], sign: float) -> np.ndarray:
        n = math.prod(shape)
        return sign * np.arange(1, n + 1, dtype=np.float32 if n < 1 << 24 else np.float64).reshape(shape)

    return count(layer.kernel_shape, 1.0), (count(layer.bias_shape, -1.0) if layer.bias else None)


def _layer_name(layer: LayerSpec) -> str:
    if isinstance(layer, DenseSpec):
        return "dense"
    if layer.is_depthwise_layout:
        return "depthwise"
    return "conv_transpose" if layer.transposed else "conv"


def preset_kwargs(layer: LayerSpec) -> dict[str, Any]:
    """Arguments of :func:`equivcheck.spec` that rebuild ``layer`` under a preset (defaults omitted)."""
    kw: dict[str, Any] = {"channels": layer.channels, "spatial": tuple(layer.spatial), "units": layer.units}
    if isinstance(layer, ConvSpec):
        r = layer.rank
        if layer.kernel_size != layer.spatial:
            kw["kernel_size"] = layer.kernel_size
        for name, default in (("stride", (1,) * r), ("dilation", (1,) * r), ("output_padding", (0,) * r)):
            if getattr(layer, name) != default:
                kw[name] = getattr(layer, name)
        if layer.padding != "valid":
            kw["padding"] = layer.padding
        if layer.groups != 1 and not layer.is_depthwise_layout:
            kw["groups"] = layer.groups
    if not layer.bias:
        kw["bias"] = False
    return kw


def as_preset(layer: LayerSpec, preset: str, kind: str | None = None) -> LayerSpec | None:
    """``layer``'s shape under another preset's conventions (as its ``kind`` of layer: default
    ``layer``'s own), or None when that preset has no such layer."""
    kind = kind or _layer_name(layer)
    kw = preset_kwargs(layer)
    if kind == "depthwise":
        kw.pop("groups", None)
        kw["multiplier"] = layer.units // layer.channels
    try:
        return spec(f"{preset}:{kind}", **kw)
    except EquivcheckError:
        return None


def layer_kinds(layer: LayerSpec) -> tuple[str, ...]:
    """The preset layers a layer of this shape can be: a conv with one group per channel may be depthwise."""
    if isinstance(layer, DenseSpec):
        return ("dense",)
    if layer.transposed:
        return ("conv_transpose",)
    depthwise = layer.groups == layer.channels and layer.units % layer.channels == 0
    return ("conv", "depthwise") if depthwise else ("conv",)


def _equal(a: Any, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).astype(b.dtype), b)


def identify(source: LayerSpec, target: LayerSpec, kernel: Any, bias: Any = None, *,
             source_kernel: Any = None, source_bias: Any = None) -> Identification:
    """Name the conventions of ``kernel``/``bias``: the target weights a converter made of the source's.

    ``source_kernel``/``source_bias`` are what was converted (default: :func:`probe_weights`).
    """
    label = target.name or target.kind
    if math.prod(source.kernel_shape) > IDENTIFY_MAX_ELEMENTS:
        return Identification(label, problem=f"not identified: the kernel has more than {IDENTIFY_MAX_ELEMENTS} weights")
    if source_kernel is None:
        source_kernel, source_bias = probe_weights(source)
    src = np.asarray(source_kernel, dtype=np.float64)
    got = np.asarray(kernel, dtype=np.float64)
    if got.shape != target.kernel_shape:
        return Identification(label, problem=f"returns a kernel of shape {got.shape}, {label} expects {target.kernel_shape}")
    if not np.array_equal(np.sort(got, axis=None), np.sort(src, axis=None)):
        return Identification(label, problem="changes weight values (not a rearrangement: scaled, summed or cast)")
    same_as = tuple(_same_as(source, target, src, got))
    try:
        right = plan(source, target)
    except NoMapping as exc:
        return Identification(label, same_as=same_as, problem=f"no right mapping exists: {exc}")
    found = dict(target=label, same_as=same_as, right=right)
    wrong = [m for m in mutants(source, target, right) if not m.ambiguous and m.target is None]
    if _equal(right.apply(src), got):
        if _bias_right(source_bias, bias):
            return Identification(**found, exact=True)
        bias_mistakes = _bias_mistakes(wrong, source_bias, bias)
        return Identification(**found, mistakes=bias_mistakes, problem="" if bias_mistakes else "the kernel is right, the bias is not")
    kernel_wrong = [m for m in wrong if m.bias is None]
    matched = [m for m in kernel_wrong if _equal(m.mapping.apply(src), got)]
    if matched:
        if len({m.convention for m in matched}) > 1:  # the data cannot tell which mistake
            return Identification(**found, problem="matches mistakes of several conventions on these weights")
        bias_differs = source_bias is not None and bias is not None and not _equal(bias, np.asarray(source_bias, np.float64))
        return Identification(**found, mistakes=(matched[0],), problem="the bias differs too" if bias_differs else "")
    # Two mistakes at once: compose each mutant's error (a rearrangement of the target kernel).
    undo = right.inverse()
    errors = [(m, undo.then(m.mapping)) for m in kernel_wrong if math.prod(m.mapping.in_shape) == math.prod(m.mapping.out_shape)]
    expected = right.apply(src)
    for i, (a, ea) in enumerate(errors):
        first = ea.apply(expected)
        for b, eb in errors[i + 1:]:
            if _equal(eb.apply(first), got) or _equal(ea.apply(eb.apply(expected)), got):
                return Identification(**found, mistakes=(a, b))
    return Identification(**found)


def _bias_right(source_bias: Any, bias: Any) -> bool:
    """The bias is the source's (zeros, or none, where the source has none); unknown counts as right."""
    if bias is None or source_bias is None:
        return bias is None or not np.any(np.asarray(bias))
    src, got = np.asarray(source_bias, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    return src.shape == got.shape and _equal(src, got)


def _bias_mistakes(wrong: list[Mutant], source_bias: Any, bias: Any) -> tuple[Mutant, ...]:
    """The bias mutant a converter's bias is, the kernel being right; () when the bias is right or unknown."""
    if source_bias is None or bias is None:
        return ()
    src, got = np.asarray(source_bias, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if got.shape != src.shape or _equal(src, got):
        return ()
    return tuple(m for m in wrong if m.bias is not None and _equal(m.bias.apply(src), got))[:1]


def _same_as(source: LayerSpec, target: LayerSpec, src: np.ndarray, got: np.ndarray) -> list[str]:
    out = []
    for preset in PRESETS:
        other = as_preset(target, preset)
        if other is None or other.name == target.name or other.kernel_shape != target.kernel_shape:
            continue
        try:
            if _equal(plan(source, other).apply(src), got):
                out.append(other.name)
        except EquivcheckError:
            continue
    return out

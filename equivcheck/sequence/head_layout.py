"""Find the head layout of a black-box attention layer.

The black box is a function ``layer(weights, q, k, v) -> outputs`` taking weights under an
attention spec's parameter names and shapes. One forward call on drawn weights and inputs is
compared with the reference under every layout the storage's shapes allow (q/k/v order, fused
layout, head split, heads count, output orientation): the one that agrees within the bound,
alone, is the answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, NoMapping, SpecError
from equivcheck.sequence import reference
from equivcheck.sequence.backends import backend_of
from equivcheck.sequence.explore import is_recurrent_object
from equivcheck.sequence.named import tensor_shapes
from equivcheck.sequence.specs import AttentionSpec
from equivcheck.sequence.verify import draw, tolerance

_AXIS_WORDS = {"n": "heads", "d": "head_dim"}


@dataclass(frozen=True)
class AttentionLayout:
    """How a layer reads the stored tensors of an attention spec (``spec``'s names and shapes).

    ``spec.heads``/``head_dim``: how the layer splits the projections into heads. ``qkv``: the
    roles in storage order (``"kqv"``: the first third of a fused tensor, or the ``query``
    kernel, is read as the key projection). ``axes``: the projections' output axis read as
    ``"3nd"`` (q;k;v, then heads, then head_dim: stacked), ``"n3d"`` (interleaved per head, as
    GPT-NeoX) or another order of ``3``, ``n``, ``d`` (one tensor per projection: ``3`` first);
    Keras-style kernels (in, heads, head_dim): ``"3nd"`` or ``"3dn"`` (heads and head_dim
    swapped). ``out``: a 2-D output kernel read as ``"out,in"`` or ``"in,out"`` (its ``in``
    axis split as ``axes`` splits the projections).
    """

    spec: AttentionSpec
    qkv: str = "qkv"
    axes: str = "3nd"
    out: str = "out,in"

    def canonical(self) -> Any:
        """The :class:`~equivcheck.sequence.named.NamedMapping` from the stored dict to the canonical one."""
        from equivcheck.sequence.named import NamedMapping

        return NamedMapping(tuple(_layout_plans(self).items()), None, None)

    def from_canonical(self) -> Any:
        """The :class:`~equivcheck.sequence.named.NamedMapping` from the canonical dict to the stored one."""
        from equivcheck.sequence.named import NamedMapping, Select, TensorPlan, from_canonical

        if self == standard_layout(self.spec):
            return from_canonical(self.spec)
        plans = {}
        for canon, p in _layout_plans(self).items():
            back = TensorPlan((canon,), p.out_shape, _inverse(p))
            for j, source in enumerate(p.sources):
                plans[source] = back if len(p.sources) == 1 else back.then(Select(0, j))
        return NamedMapping(tuple(plans.items()), None, self.spec)

    def presets(self) -> tuple[str, ...]:
        """The attention presets (``"neox:mha"``) whose own layout this is, on tensors of the same shapes."""
        from equivcheck.sequence.specs import ATTENTION_STORAGES

        mine = _role_shapes(self.spec)
        out = []
        for storage in ATTENTION_STORAGES:
            try:
                other = self.spec.replace(storage=storage, name="")
                std = standard_layout(other)
            except SpecError:
                continue
            if _role_shapes(other) == mine and (std.qkv, std.axes, std.out) == (self.qkv, self.axes, self.out):
                out.append(f"{storage}:mha")
        return tuple(out)

    def describe(self) -> str:
        """``2 heads of 4: in_proj_weight rows (q;k;v, heads, head_dim), out_proj.weight (out, in)``."""
        s, form = self.spec, _form(self.spec)
        names = _role_names(s)
        head = f"{s.heads} head{'s' if s.heads > 1 else ''} of {s.head_dim}"
        split = ", ".join(_AXIS_WORDS[a] for a in self.axes if a != "3")
        if form.kind == "split":
            return (f"{head}: {', '.join(names['Win'])} read as {', '.join(self.qkv)}, each (in, {split}); "
                    f"{names['Wo'][0]} ({split}, out)")
        axis = "rows" if form.rows == 0 else "columns"
        out = "out, in" if self.out == "out,in" else "in, out"
        extra = f", in as ({split})" if self.axes.index("d") < self.axes.index("n") else ""
        if form.kind == "fused":
            parts = ", ".join(";".join(self.qkv) if a == "3" else _AXIS_WORDS[a] for a in self.axes)
            return f"{head}: {names['Win'][0]} {axis} ({parts}), {names['Wo'][0]} ({out}{extra})"
        return (f"{head}: {', '.join(names['Win'])} read as {', '.join(self.qkv)}, {axis} ({split}); "
                f"{names['Wo'][0]} ({out}{extra})")

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"layer": s.describe(), "kind": f"attention, {self.describe()}", "storage": s.storage,
                "embed_dim": s.embed_dim, "heads": s.heads, "head_dim": s.head_dim, "bias": s.bias,
                "qkv_order": ",".join(self.qkv), "axes": self.axes, "out": self.out,
                "standard": self == standard_layout(s), "presets": list(self.presets())}


@dataclass(frozen=True)
class _Form:
    """How a storage keeps the projections: ``fused`` (one q/k/v tensor), ``flat`` (one 2-D tensor per projection)
    or ``split`` (one (in, heads, head_dim) kernel per projection); ``rows``: the axis of the projections' outputs."""

    kind: str
    rows: int


def _role_names(spec: AttentionSpec) -> dict[str, tuple[str, ...]]:
    """Canonical tensor (``Win``, ``bin``, ``Wo``, ``bo``) → the stored names it is read from."""
    from equivcheck.sequence.named import canonical

    return {name: p.sources for name, p in canonical(spec).items()}


def _role_shapes(spec: AttentionSpec) -> tuple[Any, ...]:

    shapes = tensor_shapes(spec)
    return tuple((role, tuple(shapes[n] for n in names)) for role, names in sorted(_role_names(spec).items()))


def _ids(spec: AttentionSpec) -> dict[str, np.ndarray]:
    """Each stored tensor filled with its entries' numbers, distinct across tensors."""

    start, ids = 0, {}
    for name, shape in tensor_shapes(spec).items():
        n = int(np.prod(shape))
        ids[name] = np.arange(start, start + n).reshape(shape)
        start += n
    return ids


def _proxy(spec: AttentionSpec) -> AttentionSpec:
    """``spec``'s storage at small sizes where no two readings coincide (2 heads of 3): what its storage does."""
    extra = {"kv_heads": 2} if any(f.name == "kv_heads" for f in dataclasses.fields(spec)) else {}
    return spec.replace(embed_dim=6, heads=2, head_dim=3, name="", **extra)


def _form(spec: AttentionSpec) -> _Form:
    return _proxy_form(_proxy(spec))


@lru_cache(maxsize=64)
def _proxy_form(spec: AttentionSpec) -> _Form:
    from equivcheck.sequence.named import canonical

    sources = _role_names(spec)["Win"]
    if len(tensor_shapes(spec)[sources[0]]) == 3:
        return _Form("split", 0)
    win = canonical(spec)["Win"].apply(_ids(spec))  # (3, heads, head_dim, E): contiguous along E when rows are axis 0
    rows = 0 if spec.embed_dim == 1 or win[0, 0, 0, 1] - win[0, 0, 0, 0] == 1 else 1
    return _Form("fused" if len(sources) == 1 else "flat", rows)


def _layout_plans(layout: AttentionLayout) -> dict[str, Any]:
    """Canonical name → :class:`TensorPlan` reading it from the stored tensors as ``layout`` does."""
    from equivcheck.sequence.named import Take, TensorPlan

    take = Take(0, tuple(layout.qkv.index(r) for r in "qkv"))
    return {name: TensorPlan(p.sources, p.source_shape, (*p.steps, take) if name in ("Win", "bin") else p.steps)
            for name, p in _readings(layout.spec, layout.axes, layout.out).items()}


@lru_cache(maxsize=1024)
def _readings(s: AttentionSpec, axes: str, out_: str) -> dict[str, Any]:
    """:func:`_layout_plans` before the q/k/v order (shared by the six orders: mappings keep their simplified form)."""
    from equivcheck.mapping import Mapping
    from equivcheck.sequence.named import TensorPlan

    form = _form(s)
    E, N, Dh, inner = s.embed_dim, s.heads, s.head_dim, s.inner_dim
    names, shapes = _role_names(s), tensor_shapes(s)
    size = {"3": 3, "n": N, "d": Dh}
    perm = tuple(axes.index(a) for a in "3nd")
    plans: dict[str, Any] = {}
    m = Mapping.identity
    if form.kind == "split":  # (3, E, a, b) stacked: a, b = heads, head_dim ("3nd") or head_dim, heads ("3dn")
        swap = axes == "3dn"
        plans["Win"] = TensorPlan(names["Win"], (E, N, Dh), (m((3, E, N, Dh)).transpose(0, 3, 2, 1) if swap
                                                             else m((3, E, N, Dh)).transpose(0, 2, 3, 1),))
        plans["Wo"] = TensorPlan(names["Wo"], (N, Dh, E), (m((N, Dh, E)).transpose(2, 1, 0) if swap
                                                          else m((N, Dh, E)).transpose(2, 0, 1),))
        if s.bias:
            plans["bin"] = TensorPlan(names["bin"], (N, Dh), (m((3, N, Dh)).transpose(0, 2, 1),) if swap else ())
    else:
        shape = shapes[names["Win"][0]]
        w = m(shape if form.kind == "fused" else (3, *shape))
        if form.rows == 1:
            w = w.transpose(1, 0) if form.kind == "fused" else w.transpose(0, 2, 1)
        w = w.reshape(*(size[a] for a in axes), E).transpose(*perm, 3)
        plans["Win"] = TensorPlan(names["Win"], shape, (w,))
        wo = m((inner, E)).transpose(1, 0) if out_ == "in,out" else m((E, inner))
        split = [a for a in axes if a != "3"]
        wo = wo.reshape(E, *(size[a] for a in split)).transpose(0, 1 + split.index("n"), 1 + split.index("d"))
        plans["Wo"] = TensorPlan(names["Wo"], wo.in_shape, (wo,))
        if s.bias:
            bshape = shapes[names["bin"][0]]
            b = m(bshape if form.kind == "fused" else (3, *bshape)).reshape(*(size[a] for a in axes)).transpose(*perm)
            plans["bin"] = TensorPlan(names["bin"], bshape, (b,))
    if s.bias:
        plans["bo"] = TensorPlan(names["bo"], (E,), ())
    return plans


def _inverse(p: Any) -> tuple[Any, ...]:
    """The steps of ``p`` (mappings and takes) undone, in reverse order."""
    from equivcheck.mapping import Mapping
    from equivcheck.sequence.named import Take

    inv: list[Any] = []
    for step in reversed(p.steps):
        if isinstance(step, Mapping):
            inv.append(step.inverse())
        else:
            assert isinstance(step, Take)
            inv.append(Take(step.axis, tuple(sorted(range(len(step.indices)), key=step.indices.__getitem__))))
    return tuple(inv)


def _key(read: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((k, read[k].shape, read[k].tobytes()) for k in sorted(read))


def _check_attention(spec: Any) -> AttentionSpec:
    if not isinstance(spec, AttentionSpec):
        raise SpecError(f"spec={spec!r} is not an AttentionSpec: only attention layers have a head layout")
    kv = getattr(spec, "kv_heads", None)
    if kv not in (None, spec.heads):
        raise SpecError(f"kv_heads={kv} with heads={spec.heads}: explore takes attention whose keys and values have "
                        "as many heads as its queries (kv_heads=heads)")
    return spec


def _with_heads(spec: AttentionSpec, heads: int) -> AttentionSpec:
    if heads == spec.heads:
        return spec
    extra = {"kv_heads": heads} if any(f.name == "kv_heads" for f in dataclasses.fields(spec)) else {}
    return spec.replace(heads=heads, head_dim=spec.inner_dim // heads, **extra)


def _shape_candidates(spec: AttentionSpec) -> tuple[list[str], list[str]]:
    """The ``axes`` and ``out`` readings that ``spec``'s stored shapes allow (its heads count fixed)."""
    form = _form(spec)
    if form.kind == "split":
        return (["3nd", "3dn"] if spec.heads == spec.head_dim else ["3nd"]), ["out,in"]
    axes = ["".join(p) for p in itertools.permutations("3nd") if form.kind == "fused" or p[0] == "3"]
    outs = ["out,in", "in,out"] if spec.inner_dim == spec.embed_dim else [standard_layout(spec).out]
    return axes, outs


def attention_layouts(spec: AttentionSpec, heads: int | tuple[int, ...] | None = None) -> list[AttentionLayout]:
    """Every layout ``spec``'s stored shapes allow, distinct readings only, ``spec``'s own first.

    Fused q/k/v (torch, GPT-2, GPT-NeoX): the 6 orders of the q;k;v, heads and head_dim axes;
    one tensor per projection (Llama): heads, head_dim in either order; both: the 6 orders of
    q, k, v, both orientations of a square output kernel and each heads count in ``heads``
    (default: every divisor of the projections' width). Keras-style kernels (in, heads,
    head_dim): the orders of q, k, v, and heads swapped with head_dim where their sizes are equal.
    """
    spec = _check_attention(spec)
    std = standard_layout(spec)
    if _form(spec).kind == "split":
        counts = [spec.heads]
    else:
        inner = spec.inner_dim
        counts = [d for d in range(1, inner + 1) if inner % d == 0] if heads is None else (
            [heads] if isinstance(heads, int) else list(heads))
        for h in counts:
            if isinstance(h, bool) or not isinstance(h, int) or h < 1 or inner % h:
                raise SpecError(f"heads={h!r} does not divide the projections' width {inner}: expected a divisor")
    found: list[AttentionLayout] = []
    for h in counts:
        hs = _with_heads(spec, h)
        axes, outs = _shape_candidates(hs)
        found += [AttentionLayout(hs, "".join(q), a, o) for a in axes for q in itertools.permutations("qkv") for o in outs]
    found.sort(key=lambda c: (c.spec.heads != spec.heads, c.axes != std.axes, c.qkv != std.qkv, c.out != std.out))
    seen, out = set(), []
    for c in found:
        s = c.spec  # a size-1 axis may go anywhere: the same reading
        key = (s.heads, "".join(a for a in c.axes if (a, s.heads if a == "n" else s.head_dim) not in (("n", 1), ("d", 1))),
               c.qkv, c.out)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def standard_layout(spec: AttentionSpec) -> AttentionLayout:
    """The layout ``spec``'s storage stands for (how :func:`equivcheck.sequence.named.canonical` reads it)."""
    std = _proxy_standard(_proxy(_check_attention(spec)))
    return AttentionLayout(spec, std.qkv, std.axes, std.out)


@lru_cache(maxsize=64)
def _proxy_standard(spec: AttentionSpec) -> AttentionLayout:
    from equivcheck.sequence.named import canonical

    ids = _ids(spec)
    want = _key(canonical(spec).apply(ids))
    form = _form(spec)
    axes = ["3nd", "3dn"] if form.kind == "split" else [
        "".join(p) for p in itertools.permutations("3nd") if form.kind == "fused" or p[0] == "3"]
    for a in axes:
        for q in itertools.permutations("qkv"):
            for o in ("out,in", "in,out"):
                layout = AttentionLayout(spec, "".join(q), a, o)
                with contextlib.suppress(EquivcheckError):
                    if _key(layout.canonical().apply(ids)) == want:
                        return layout
    raise SpecError(f"{spec.describe()}: storage={spec.storage!r} reads as none of the layouts explore knows")


def _evaluate(layout: AttentionLayout, weights: dict[str, np.ndarray]) -> tuple[AttentionSpec, dict[str, np.ndarray]]:
    """A spec and its weights that the reference runs as ``layout`` reads ``weights``."""
    from equivcheck.sequence.named import from_canonical

    s = layout.spec
    ref = AttentionSpec(s.embed_dim, s.heads, s.head_dim, storage="keras", bias=s.bias)
    return ref, layout.canonical().then(from_canonical(ref)).apply(weights)


def find_attention_layout(layer: Callable[..., Any], spec: AttentionSpec, *, dtype: str = "float32", seed: int = 0,
                          heads: int | tuple[int, ...] | None = None) -> AttentionLayout:
    """The layout ``layer(weights, q, k, v)`` computes with ``spec``'s tensors; one forward call.

    Every candidate of :func:`attention_layouts` is run on the float64 reference with the same
    weights and inputs; the one within the error bound, alone, is the answer. Raises
    :class:`NoMapping` when none, or more than one, explains the output.
    """
    spec = _check_attention(spec)
    weights, inputs = draw(spec, seed=seed, steps=5)
    weights = {k: v.astype(dtype).astype(np.float64) for k, v in weights.items()}
    inputs = tuple(a.astype(dtype).astype(np.float64) for a in inputs)
    got = np.asarray(layer({k: v.astype(dtype) for k, v in weights.items()}, *(a.astype(dtype) for a in inputs)),
                     dtype=np.float64)
    if got.shape != inputs[0].shape:
        raise NoMapping(f"the layer's output has shape={got.shape}: expected {inputs[0].shape} (batch, query time, embed_dim)")
    outputs = [(c, reference.forward(*_evaluate(c, weights), inputs)) for c in attention_layouts(spec, heads)]
    errors = [float(np.abs(o - got).max()) for _, o in outputs]
    i = int(np.argmin(errors))
    found, mine = outputs[i]
    # the runner-up among readings that compute another function (one computing the same adds nothing)
    others = [(e, j) for j, (e, (_, o)) in enumerate(zip(errors, outputs))
              if np.abs(o - mine).max() > 1e-9 * (1 + np.abs(mine).max())]
    best, (second, j) = errors[i], min(others, default=(np.inf, -1))
    bound = 2 * tolerance(*_evaluate(found, weights), inputs, dtype)
    if best > bound:
        raise NoMapping(f"no attention layout of {spec.describe()} explains the layer: the closest ({found.describe()}) "
                        f"is {best:.3g} away (bound {bound:.3g})")
    if second <= 4 * bound:
        raise NoMapping(f"the drawn data cannot tell apart two layouts of {spec.describe()}: {found.describe()} and "
                        f"{outputs[j][0].describe()} ({best:.3g} vs {second:.3g}, bound {bound:.3g})")
    return found


@dataclass(frozen=True)
class AttentionBlackBox:
    """An attention layer known only by calling it: ``layer(weights, q, k, v) -> output`` with ``weights`` keyed
    and shaped as ``spec``'s (how it reads them, the unknown) and q, k, v (batch, time, embed_dim)."""

    layer: Callable[..., Any]
    spec: AttentionSpec


def is_attention_object(obj: Any) -> bool:
    """Whether ``obj`` is something :func:`explore_attention` takes: an attention spec, an ``*:mha`` preset name,
    torch ``nn.MultiheadAttention``, Keras ``MultiHeadAttention`` or an :class:`AttentionBlackBox`."""
    from equivcheck.sequence.presets import is_sequence_name

    if isinstance(obj, (AttentionSpec, AttentionBlackBox)):
        return True
    if isinstance(obj, str):
        return is_sequence_name(obj) and obj.endswith(":mha")
    kind = type(obj)
    if kind.__module__.startswith("torch.nn") and kind.__name__ == "MultiheadAttention":
        return True
    return kind.__module__.startswith("keras") and kind.__name__ == "MultiHeadAttention"


def _torch_attention_box(module: Any) -> AttentionBlackBox:
    import torch
    from torch.func import functional_call

    from equivcheck.sequence.presets import spec as preset

    E = module.embed_dim
    if module.kdim != E or module.vdim != E:
        raise SpecError(f"torch MultiheadAttention kdim={module.kdim}, vdim={module.vdim}: explore takes kdim=vdim=embed_dim={E}")
    if module.bias_k is not None or module.add_zero_attn:
        raise SpecError("torch MultiheadAttention with add_bias_kv=True or add_zero_attn=True: explore takes neither")
    spec = preset("torch:mha", embed_dim=E, heads=module.num_heads, bias=module.in_proj_bias is not None)
    dtype = module.in_proj_weight.dtype

    def layer(weights: dict[str, np.ndarray], *qkv: np.ndarray) -> np.ndarray:
        params = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(dtype) for k, v in weights.items()}
        q, k, v = (torch.as_tensor(np.asarray(a, dtype=np.float32)).to(dtype) for a in qkv)
        if not module.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        training = module.training
        module.eval()  # no dropout
        try:
            with torch.no_grad():
                out = functional_call(module, params, (q, k, v), {"need_weights": False})[0]
        finally:
            module.train(training)
        return (out if module.batch_first else out.transpose(0, 1)).double().numpy()

    return AttentionBlackBox(layer, spec.replace(name="torch MultiheadAttention"))


def _keras_attention_box(keras_layer: Any) -> AttentionBlackBox:
    from equivcheck.sequence.presets import spec as preset

    if not keras_layer.built:
        raise SpecError("Keras MultiHeadAttention is not built: call it once on (query, value) of shape (batch, time, features)")
    named = {"/".join(v.path.split("/")[-2:]): v for v in keras_layer.weights}
    E = int(named["query/kernel"].shape[0])
    if keras_layer.value_dim != keras_layer.key_dim:
        raise SpecError(f"Keras MultiHeadAttention value_dim={keras_layer.value_dim}: explore takes value_dim=key_dim="
                        f"{keras_layer.key_dim}")
    widths = {k: int(named[f"{k}/kernel"].shape[0]) for k in ("key", "value")} | {
        "output": int(named["attention_output/kernel"].shape[-1])}
    if any(w != E for w in widths.values()):
        raise SpecError(f"Keras MultiHeadAttention widths {widths}: explore takes key, value and output of the "
                        f"query's width {E}")
    spec = preset("keras:mha", embed_dim=E, heads=int(keras_layer.num_heads), head_dim=int(keras_layer.key_dim),
                  bias=bool(keras_layer.use_bias))

    def layer(weights: dict[str, np.ndarray], q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        saved = {name: np.asarray(var.numpy()) for name, var in named.items()}
        try:
            for name, value in weights.items():
                named[name].assign(np.asarray(value, dtype=np.float32))
            f32 = [np.asarray(a, dtype=np.float32) for a in (q, k, v)]
            return np.asarray(keras_layer(f32[0], f32[2], key=f32[1]), dtype=np.float64)  # Keras: (query, value, key)
        finally:
            for name, value in saved.items():
                named[name].assign(value)

    return AttentionBlackBox(layer, spec.replace(name="Keras MultiHeadAttention"))


def _attention_box(obj: Any, other: AttentionSpec | None) -> AttentionBlackBox:
    """A black box of ``obj``; a preset name borrows the other side's sizes and runs on its framework."""
    from equivcheck.sequence.backends import run
    from equivcheck.sequence.presets import spec as preset

    if isinstance(obj, AttentionBlackBox):
        return obj
    if is_recurrent_object(obj):
        raise NoMapping(f"no mapping between an attention layer and a recurrent one ({obj!r}): they compute different functions")
    if isinstance(obj, str):
        if other is None:
            raise SpecError(f"{obj!r} has no sizes: pass an attention layer on the other side, or a spec")
        try:
            obj = preset(obj, embed_dim=other.embed_dim, heads=other.heads, head_dim=other.head_dim, bias=other.bias)
        except SpecError as exc:
            raise NoMapping(f"{obj} cannot hold {other.describe()}: {exc}") from None
    if isinstance(obj, AttentionSpec):
        layer_spec = obj
        return AttentionBlackBox(lambda w, *qkv: run(backend_of(layer_spec), layer_spec, w, tuple(qkv)), layer_spec)
    if is_attention_object(obj) and type(obj).__module__.startswith("torch"):
        return _torch_attention_box(obj)
    if is_attention_object(obj) and type(obj).__module__.startswith("keras"):
        return _keras_attention_box(obj)
    raise SpecError(f"{type(obj).__name__} is not an attention layer: expected torch nn.MultiheadAttention, Keras "
                    "MultiHeadAttention, an AttentionBlackBox, an AttentionSpec or a PRESET:mha name")


@dataclass
class AttentionExploration:
    """What probing found: each side's attention layout, and the plan between them."""

    found: bool
    reason: str
    source: AttentionLayout | None
    target: AttentionLayout | None
    code: dict[str, str]
    forward_calls: int
    seconds: float = 0.0
    imports: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "reason": self.reason,
                "source": None if self.source is None else self.source.to_dict(),
                "target": None if self.target is None else self.target.to_dict(),
                "code": dict(self.code), "forward_calls": self.forward_calls, "seconds": self.seconds}

    def render(self) -> str:
        lines = []
        for role, s in (("source", self.source), ("target", self.target)):
            if s is not None:
                known = s.presets()
                tail = f" (the layout of {', '.join(known)})" if known else " (no preset's layout)"
                lines.append(f"{role:7s} {s.spec.name}: attention, {s.describe()}{tail}")
        if self.found:
            lines += ["mapping (numpy):", *(f"  {line}" for line in self.code.get("numpy", "").splitlines())]
        else:
            lines.append(f"not found: {self.reason}")
        lines.append(f"{self.forward_calls} forward calls")
        return "\n".join(lines)


def explore_attention(source: Any, target: Any = None, *, seed: int = 0) -> AttentionExploration:
    """The layout of each attention black box, found by probing, and the plan from ``source`` to ``target``.

    Each side: a torch ``nn.MultiheadAttention``, a built Keras ``MultiHeadAttention``, an
    :class:`AttentionBlackBox`, a spec or a ``PRESET:mha`` name (sized like the other side).
    ``target=None``: the source's own storage in its standard layout. One forward call per side.
    A black box is tried with every heads count its storage allows; a framework layer or preset
    with the heads count it states (the other candidates grow with embed_dim's divisors).
    """
    from equivcheck.sequence.named import plan

    calls = [0]

    def counted(box: AttentionBlackBox) -> Callable[..., Any]:
        def layer(w: dict[str, np.ndarray], *qkv: np.ndarray) -> Any:
            calls[0] += 1
            return box.layer(w, *qkv)

        return layer

    objs = (source, target)
    order = (1, 0) if isinstance(source, str) and target is not None else (0, 1)
    found: list[AttentionLayout | None] = [None, None]
    try:
        for i in order:
            if objs[i] is None:
                continue
            other = found[1 - i]
            box = _attention_box(objs[i], None if other is None else other.spec)
            # a framework layer or preset states its heads count; a black box's is a belief, every count is tried
            known = None if isinstance(objs[i], AttentionBlackBox) else box.spec.heads
            layout = find_attention_layout(counted(box), box.spec, seed=seed, heads=known)
            found[i] = dataclasses.replace(layout, spec=layout.spec.replace(name=box.spec.name))
    except NoMapping as exc:
        return AttentionExploration(False, str(exc), found[0], found[1], {}, calls[0])
    src, dst = found
    assert src is not None
    if dst is None:
        own = src.spec.replace(name=f"{src.spec.storage}:mha")
        dst = dataclasses.replace(standard_layout(own), spec=own)
    try:
        plan(src.spec, dst.spec)  # the same sizes, heads and bias, or why not
    except NoMapping as exc:
        return AttentionExploration(False, str(exc), src, dst, {}, calls[0])
    mapping = src.canonical().then(dst.from_canonical())
    return AttentionExploration(True, "", src, dst, {lang: mapping.code(lang) for lang in ("numpy", "torch")}, calls[0])

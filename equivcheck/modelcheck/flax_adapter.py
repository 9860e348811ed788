"""Flax linen models for ``check_models``: a ``(module, variables)`` tuple.

``module`` is a ``flax.linen.Module`` and ``variables`` its ``{"params": ...}`` dict (what
``module.init`` returns). Channels last throughout: ``nn.Dense`` kernels ``(in, out)`` (``IO``),
``nn.Conv`` kernels ``HWIO`` (``feature_group_count`` as groups, depthwise when it equals the
input channels), ``nn.ConvTranspose`` kernels ``HWIO`` used as-is by ``lax.conv_transpose``
(``transpose_kernel=False``: true convolution, the kernel flipped relative to torch's; with
``transpose_kernel=True``, ``HWOI`` correlated as torch does), as the ``flax`` preset says.

Capture: the model is traced once (``jax.make_jaxpr``) under ``flax.linen.intercept_methods``,
which marks each Dense/Conv/ConvTranspose call's input and output with an identity primitive;
the traced program then runs once with those values, and the map each dense input was flattened
from (back through reshapes and transposes), as extra outputs. Replay: the layer's class rebuilt
from its attributes, applied alone with its own variables. flax and jax are imported only when
such a model is given.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from equivcheck.modelcheck.adapters import Adapter, ModelError, first_line, outermost, per_position, resolve_layout
from equivcheck.modelcheck.layers import Linear, Other, conv_letters
from equivcheck.specs import CHANNELS_LAST

__all__ = ["FlaxAdapter", "is_flax"]

_SHAPE_ONLY = {"reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p"}
_TAP: list[Any] = []  # the marking primitive, made on first use (jax imported lazily)


def is_flax(model: Any) -> bool:
    """A ``flax.linen.Module``, bare or first in a tuple (a bare one is refused with the reason)."""
    linen = sys.modules.get("flax.linen")
    if linen is None:
        return False
    return isinstance(model, linen.Module) or (isinstance(model, tuple) and len(model) == 2
                                               and isinstance(model[0], linen.Module))


def _tap() -> Any:
    """An identity primitive whose equations in a traced program mark a layer's input or output."""
    if not _TAP:
        from jax.extend.core import Primitive

        tap = Primitive("equivcheck_tap")
        tap.def_impl(lambda x, **_: x)
        tap.def_abstract_eval(lambda x, **_: x)
        _TAP.append(tap)
    return _TAP[0]


def _ints(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


def _lax_pads(padding: Any, rank: int) -> str | list[tuple[int, int]]:
    from flax.linen.linear import canonicalize_padding

    pads = canonicalize_padding(padding, rank)
    return pads if isinstance(pads, str) else [(int(lo), int(hi)) for lo, hi in pads]


def _same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """``lax``'s SAME padding of a convolution (the extra one after)."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _transpose_pads(k: int, s: int, pad: Any) -> tuple[int, int]:
    """``lax.conv_transpose``'s padding of the stride-dilated input (``jax._src.lax.convolution``)."""
    if pad == "SAME":
        pad_len = k + s - 2
        before = k - 1 if s > k - 1 else -(-pad_len // 2)
    elif pad == "VALID":
        pad_len, before = k + s - 2 + max(k - s, 0), k - 1
    else:  # explicit pads go to the dilated input as they are
        return pad
    return before, pad_len - before


class FlaxAdapter(Adapter):
    framework, backend, label = "flax", "jax", "Flax"
    recast = "params in {}"
    data_format = CHANNELS_LAST

    def __init__(self, model: Any, role: str) -> None:
        if not isinstance(model, tuple) or len(model) != 2 or not isinstance(model[1], Mapping) \
                or not isinstance(model[1].get("params"), Mapping):
            got = type(model).__name__ if not isinstance(model, tuple) else \
                f"({type(model[0]).__name__}, {type(model[1]).__name__})"
            raise ModelError(f"{role}={got} is not a Flax linen model: expected a (module, variables) tuple, "
                             "variables holding 'params' as module.init returns them")
        super().__init__(model, role)
        import jax  # noqa: F401 - flax's own dependency
        from flax import linen

        self._linen = linen
        self.module, self.variables = model
        self.name = type(self.module).__name__
        leaves = [np.dtype(leaf.dtype) for leaf in _leaves(self.variables["params"])]
        floats = [d for d in leaves if d.kind == "f" or d.name == "bfloat16"]
        self.dtype = floats[0].name if floats else "float32"
        self._traced: dict[tuple, tuple[Any, list[dict[str, Any]], dict[int, Any]]] = {}

    def input_shape(self) -> tuple[int, ...] | None:
        return None

    # -- what a layer is ---------------------------------------------------------------------------
    def _norm(self, module: Any, xshape: tuple[int, ...], variables: Mapping, kwargs: dict) -> tuple[str, dict] | None:
        """BatchNorm with running averages, LayerNorm and GroupNorm over the last (channel) axis; else None."""
        from equivcheck.modelcheck.norms import norm_config

        nn = self._linen
        if isinstance(module, nn.BatchNorm):
            running = kwargs.get("use_running_average", module.use_running_average)
            stats = variables.get("batch_stats", {})
            if not running or module.axis not in (-1, len(xshape) - 1) or "mean" not in stats:
                return None
            return "batchnorm", norm_config(mean=np.asarray(stats["mean"]), var=np.asarray(stats["var"]),
                                            eps=module.epsilon, data_format=CHANNELS_LAST, keep=float(module.momentum))
        if isinstance(module, nn.LayerNorm):
            if module.reduction_axes not in (-1, (-1,)) or module.feature_axes not in (-1, (-1,)):
                return None
            return "layernorm", norm_config(eps=module.epsilon, data_format=CHANNELS_LAST)
        if isinstance(module, nn.GroupNorm) and module.num_groups and module.group_size is None:
            return "groupnorm", norm_config(eps=module.epsilon, groups=module.num_groups, data_format=CHANNELS_LAST)
        return None

    def _config(self, module: Any, xshape: tuple[int, ...], params: Mapping) -> tuple[str, dict[str, Any]] | None:
        nn, kind = self._linen, type(module).__name__
        kernel = params.get("kernel")
        if kernel is None:
            return None
        if isinstance(module, nn.Dense):
            return "dense", {"units": int(module.features), "kernel_layout": "IO"}
        if not isinstance(module, (nn.Conv, nn.ConvTranspose)):
            return None
        rank = kernel.ndim - 2
        where = f"{self.role} layer {'/'.join(module.path) or kind!r} ({kind})"
        if len(xshape) != rank + 2:
            raise ModelError(f"{where} reads an input of shape {xshape}: expected (batch, *spatial, channels)")
        if module.mask is not None:
            raise ModelError(f"{where} has a mask: expected mask=None (the stored kernel is not what runs)")
        letters = "DHW"[3 - rank:]
        ks, stride = tuple(int(k) for k in kernel.shape[:rank]), _ints(module.strides, rank)
        dilation = _ints(module.kernel_dilation, rank)
        spatial, cin = tuple(int(s) for s in xshape[1:-1]), int(xshape[-1])
        pad = module.padding
        if isinstance(pad, str) and pad.upper() not in ("SAME", "VALID"):
            raise ModelError(f"{where} has padding={pad!r}: expected 'SAME', 'VALID' or explicit zero padding")
        pads = _lax_pads(pad.upper() if isinstance(pad, str) else pad, rank)
        common = {"kernel_size": ks, "stride": stride, "dilation": dilation, "data_format": CHANNELS_LAST}
        if isinstance(module, nn.Conv):
            if _ints(module.input_dilation, rank) != (1,) * rank:
                raise ModelError(f"{where} has input_dilation={module.input_dilation}: expected 1")
            if pads == "VALID":
                pads = [(0, 0)] * rank
            elif pads == "SAME":
                pads = [_same(*a) for a in zip(spatial, ks, stride, dilation)]
            even = all(lo == hi for lo, hi in pads)
            groups = int(module.feature_group_count)
            depthwise = groups == cin and cin > 1
            return ("depthwise" if depthwise else "conv"), {
                **common, "in_channels": cin, "out_channels": int(module.features), "groups": groups,
                "padding": tuple(lo for lo, _ in pads) if even else tuple(pads), "kernel_layout": letters + "IO"}
        # torch's (symmetric crop p, output_padding) from the pads lax puts on the dilated input
        crop, out_pad = [], []
        for i, (k, s, d) in enumerate(zip(ks, stride, dilation)):
            keff = (k - 1) * d + 1
            before, after = _transpose_pads(keff, s, pads if isinstance(pads, str) else pads[i])
            crop.append(keff - 1 - before)
            out_pad.append(after - before)
        if any(c < 0 for c in crop) or any(o < 0 for o in out_pad):
            raise ModelError(f"{where} has padding={pad!r}, which pads the dilated input by more than the kernel or "
                             "more before than after: only a symmetric crop plus output padding is described")
        flipped = not module.transpose_kernel
        return "conv_transpose", {
            **common, "in_channels": cin, "out_channels": int(module.features), "groups": 1, "padding": tuple(crop),
            "output_padding": tuple(out_pad), "kernel_layout": letters + ("IO" if flipped else "OI"),
            "op": "convolve" if flipped else "correlate"}

    # -- capture -----------------------------------------------------------------------------------
    def _trace(self, x: np.ndarray) -> tuple[Any, list[dict[str, Any]], dict[int, Any]]:
        """The traced program with every tap and each dense input's map as outputs; the layers; their map vars."""
        key = (x.shape, x.dtype.str)
        if key in self._traced:
            return self._traced[key]
        import jax
        from jax.extend import core

        nn, tap, layers, seen = self._linen, _tap(), [], {}

        def intercept(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
            module = context.module
            norms = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)
            if context.method_name != "__call__" or not args or \
                    not isinstance(module, (nn.Dense, nn.Conv, nn.ConvTranspose, *norms)):
                return next_fun(*args, **kwargs)
            variables = {c: dict(v) for c, v in module.variables.items()}
            if isinstance(module, norms):
                found = self._norm(module, tuple(args[0].shape), variables, kwargs)
            else:
                found = self._config(module, tuple(args[0].shape), variables.get("params", {}))
            if found is None:
                return next_fun(*args, **kwargs)
            name = "/".join(module.path) or type(module).__name__
            seen[name] = seen.get(name, 0) + 1
            slot = len(layers)
            layers.append({"name": name if seen[name] == 1 else f"{name}#{seen[name]}", "kind": found[0],
                           "config": found[1], "module": module, "variables": variables})
            y = next_fun(tap.bind(args[0], slot=slot, role="x"), *args[1:], **kwargs)
            return tap.bind(y, slot=slot, role="y")

        def apply(xin: Any) -> Any:
            with nn.intercept_methods(intercept):
                return self.module.apply(self.variables, xin)

        try:
            closed = jax.make_jaxpr(apply)(x)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.role} Flax model {self.name} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        jaxpr = closed.jaxpr
        if len(jaxpr.outvars) != 1:
            raise ModelError(f"{self.role} Flax model {self.name} returns {len(jaxpr.outvars)} arrays: expected one")
        producer = {v: e for e in jaxpr.eqns for v in e.outvars}
        taps = {(e.params["slot"], e.params["role"]): e.outvars[0] for e in jaxpr.eqns if e.primitive is tap}
        missing = [layer["name"] for i, layer in enumerate(layers) if (i, "x") not in taps]
        if missing:
            raise ModelError(f"{self.role} Flax model {self.name} calls {missing[0]!r} inside a transformed scope "
                             "(nn.jit, nn.scan, nn.remat...): expected plain module calls")
        maps = {}
        for i, layer in enumerate(layers):
            if layer["kind"] == "dense":
                found = _map_var(taps[i, "x"], producer, core.Literal, tap)
                if found is not None:
                    maps[i] = found
        outvars = [jaxpr.outvars[0], *(taps[i, r] for i in range(len(layers)) for r in ("x", "y")), *maps.values()]
        run = core.jaxpr_as_fun(core.ClosedJaxpr(jaxpr.replace(outvars=outvars), closed.consts))
        self._traced[key] = (run, layers, {i: n for n, i in enumerate(maps)})
        return self._traced[key]

    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        run, layers, map_index = self._trace(x)
        try:
            values = [np.asarray(v) for v in run(x)]
        except Exception as exc:
            raise ModelError(f"{self.role} Flax model {self.name} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        records, extra = [], 1 + 2 * len(layers)
        for i, layer in enumerate(layers):
            params = layer["variables"].get("params", {})
            bias = params.get("bias")
            kernel = params.get("kernel", params.get("scale"))
            if kernel is None:  # a norm layer without a scale
                kernel = np.ones(values[1 + 2 * i].shape[-1], np.float32)
            rec = Linear(layer["name"], self.framework, layer["kind"], np.asarray(kernel),
                         None if bias is None else np.asarray(bias), values[1 + 2 * i],
                         values[2 + 2 * i] if outputs else np.empty(0), dict(layer["config"]), layer=layer, index=i)
            if rec.kind == "layernorm":
                per_position(rec)
            if rec.kind == "dense":
                per_position(rec)
                if i in map_index and rec.x.ndim == 2:
                    rec.map_before = values[extra + map_index[i]]
                    rec.map_letters = conv_letters(rec.map_before.ndim - 2, CHANNELS_LAST)
            resolve_layout(rec)
            records.append(rec)
        captured = {r.name.split("#")[0] for r in records}
        self.others = outermost([Other(path or self.name, "module", held)
                                 for path, held in _holders(self.variables).items()
                                 if (path or self.name) not in captured], sep="/")
        return values[0], records

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        captured = layer.layer
        module = captured["module"]
        fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
                  if f.init and f.name not in ("parent", "name")}
        if isinstance(module, self._linen.BatchNorm):
            fields["use_running_average"] = True  # inference: the running statistics
        try:
            alone = type(module)(**fields)
            return np.asarray(alone.apply(captured["variables"], x))
        except Exception as exc:
            raise ModelError(f"{self.role} layer {layer.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None

    def magnitude_backend(self) -> str:
        return "jax"


def _holders(variables: Mapping) -> dict[str, int]:
    """Module path → how many values it holds, over every collection (params, batch_stats...)."""
    held: dict[str, int] = {}

    def walk(tree: Any, path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, (*path, str(key)))
            else:
                name = "/".join(path)
                held[name] = held.get(name, 0) + int(np.size(value))

    for collection in variables.values():
        if isinstance(collection, Mapping):
            walk(collection, ())
    return held


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [tree] if hasattr(tree, "dtype") else []


def _shape_only(eqn: Any, tap: Any) -> bool:
    """An equation that only moves values: a reshape, transpose, ... or a call of nothing else."""
    name = eqn.primitive.name
    if name in _SHAPE_ONLY:
        return True
    if name == "convert_element_type":
        return eqn.params.get("new_dtype") == eqn.invars[0].aval.dtype
    inner = eqn.params.get("jaxpr")
    if name in ("jit", "pjit") and inner is not None and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
        inner = getattr(inner, "jaxpr", inner)
        return all(_shape_only(e, tap) and len(e.invars) == 1 for e in inner.eqns)
    return False


def _map_var(var: Any, producer: dict[Any, Any], literal: type, tap: Any) -> Any:
    """The var of at least 3 dimensions a dense input was reshaped from (through its tap), or None."""
    eqn = producer.get(var)
    if eqn is None or eqn.primitive is not tap:
        return None
    current = eqn.invars[0]
    for _ in range(32):
        if isinstance(current, literal):
            return None
        if current.aval.ndim >= 3:
            return current
        eqn = producer.get(current)
        if eqn is None or not _shape_only(eqn, tap):
            return None
        current = eqn.invars[0]
    return None

"""Capture and replay, per framework: run a model once recording every linear layer's input and
output; run one layer alone on a given input.

torch: forward hooks on every leaf module (inputs and outputs copied in the hook, so in-place
activations after a layer cannot change what was recorded); the layout a flattened dense input reads
comes from the model's torch.fx graph (``torch_trace``), from the captured activations where the
graph cannot be traced or does not say (and the notes say which). Keras 3: one functional model over
the original graph whose outputs are each linear layer's input (and the map a Dense input was
flattened from); the layer's own output is recomputed by replaying it, with any fused activation
switched off. Frameworks are imported only when a model of theirs is handled.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.layers import Layout, Linear, Other, conv_letters, flatten_order
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, spatial_letters

__all__ = ["Adapter", "KerasAdapter", "ModelError", "TorchAdapter", "first_line", "outermost", "per_position", "resolve_layout"]


class ModelError(EquivcheckError, ValueError):
    """A model cannot be run, traced or described."""


def first_line(exc: BaseException) -> str:
    from equivcheck.errors import framework_message

    return framework_message(exc)


class Adapter(ABC):
    """One model's side of a check: its input shape, a run that captures each linear layer, one layer alone."""

    framework = ""
    backend = ""  # the backend whose probed facts (how it sums) describe this framework's layers
    label = ""  # the framework in a message: "the source Keras model ..."
    recast = "a model built in {}"  # what a check in another dtype needs, for a model that is not cast

    def __init__(self, model: Any, role: str) -> None:
        self.model = model
        self.role = role
        self.notes: list[str] = []
        self.others: list[Other] = []  # filled by run(): the layers with parameters that are not captured linear layers

    name = ""
    dtype = "float32"
    data_format = CHANNELS_FIRST
    #: False where no layer fixes where channels sit (a Keras model of Dense, LSTM, attention): its input
    #: is read in the other model's layout, since (batch, time, features) is the same in every framework.
    has_layout = True

    @abstractmethod
    def input_shape(self) -> tuple[int, ...] | None:
        """The model's input shape, batch first, where the model records one."""

    @abstractmethod
    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        """The model's output on ``x`` and each linear layer it ran, in execution order, with its input and output."""

    @abstractmethod
    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        """``layer`` alone on ``x`` (in its own layout)."""

    def close(self) -> None:  # noqa: B027 - most frameworks change nothing to undo
        """Undo anything done to the model for the check (training flags)."""

    def cast(self, dtype: str) -> Any | None:
        """A copy of the model computing in ``dtype``, or None where this framework's models are not cast."""
        return None

    def fixed_batch(self) -> int | None:
        """The batch size the model's graph fixes, where it fixes one (an exported graph)."""
        return None


def outermost(others: list[Other], sep: str = ".") -> list[Other]:
    """``others`` without those nested in another one (``attn.out_proj`` counted in ``attn``), first run first."""
    import dataclasses

    names = {o.name for o in others}
    kept = {o.name: o for o in others if not any(o.name.startswith(n + sep) for n in names if n != o.name)}
    for o in others:
        parent = next((n for n in kept if o.name.startswith(n + sep)), None)
        if parent is not None:
            kept[parent] = dataclasses.replace(kept[parent], weights=kept[parent].weights + o.weights)
    return sorted(kept.values(), key=lambda o: (o.after < 0, o.after))


# -- torch ---------------------------------------------------------------------------------
def _torch_numpy(t: Any, *, copy: bool = True) -> np.ndarray:
    """A numpy copy of a tensor (``copy=False``: a view where torch allows, for weights only read)."""
    from equivcheck.backends.base import np_dtype

    t = t.detach().cpu()
    name = str(t.dtype).replace("torch.", "")
    if name == "bfloat16":
        return t.float().numpy().astype(np_dtype("bfloat16"))
    return t.numpy().copy() if copy else t.numpy()


class TorchAdapter(Adapter):
    framework = backend = label = "torch"
    data_format = CHANNELS_FIRST

    def __init__(self, model: Any, role: str) -> None:
        super().__init__(model, role)
        import torch

        self._torch = torch
        self.name = type(model).__name__
        first = next(model.parameters(), None)
        self._tdtype = first.dtype if first is not None else torch.float32
        self._device = first.device if first is not None else "cpu"
        self.dtype = str(self._tdtype).replace("torch.", "")
        self._modes = {m: m.training for m in model.modules()}
        if any(self._modes.values()):
            self.notes.append(f"{role} model {self.name} was in training mode: checked in eval mode (dropout off, "
                              "batch-norm running statistics), its mode restored afterwards")
        model.eval()
        self._graph: Any = None  # the model's torch.fx graph (traced on the first run), or why it cannot be traced

    def close(self) -> None:
        for m, mode in self._modes.items():
            m.training = mode

    def cast(self, dtype: str) -> Any:
        import copy

        return copy.deepcopy(self.model).to(getattr(self._torch, dtype))

    def input_shape(self) -> tuple[int, ...] | None:
        shape = getattr(self.model, "input_shape", None)
        return None if shape is None else tuple(int(s) for s in shape)

    def _config(self, module: Any) -> tuple[str, dict[str, Any]] | None:
        nn = self._torch.nn
        norm = self._norm(module)
        if norm is not None:
            return norm
        if isinstance(module, nn.Linear):
            return "dense", {"units": module.out_features, "kernel_layout": "OI"}
        if isinstance(module, nn.modules.conv._ConvNd):
            rank = len(module.kernel_size)
            if module.padding_mode != "zeros":
                raise ModelError(f"{self.role} layer {self._names[id(module)]!r} pads with padding_mode="
                                 f"{module.padding_mode!r}: only zero padding is checked")
            transposed = bool(module.transposed)
            cfg = {
                "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": tuple(module.kernel_size), "stride": tuple(module.stride),
                "dilation": tuple(module.dilation), "groups": module.groups, "data_format": CHANNELS_FIRST,
                "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
                "kernel_layout": ("IO" if transposed else "OI") + "DHW"[3 - rank:],
            }
            if transposed:
                cfg["output_padding"] = tuple(module.output_padding)
                return "conv_transpose", cfg
            depthwise = module.groups == module.in_channels and module.in_channels > 1
            return ("depthwise" if depthwise else "conv"), cfg
        return None

    def _norm(self, module: Any) -> tuple[str, dict[str, Any]] | None:
        """Batch norm with running statistics, layer norm over the last axis, group norm; else None."""
        from equivcheck.modelcheck.norms import norm_config

        nn = self._torch.nn
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.running_mean is not None:
            keep = None if module.momentum is None else 1.0 - float(module.momentum)
            return "batchnorm", norm_config(mean=_torch_numpy(module.running_mean), var=_torch_numpy(module.running_var),
                                            eps=module.eps, data_format=CHANNELS_FIRST, keep=keep)
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            return "layernorm", norm_config(eps=module.eps, data_format=CHANNELS_FIRST)
        if isinstance(module, nn.GroupNorm):
            return "groupnorm", norm_config(eps=module.eps, groups=module.num_groups, data_format=CHANNELS_FIRST)
        return None

    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        torch = self._torch
        self._names = {id(m): n for n, m in self.model.named_modules()}
        records: list[Linear] = []
        last_map: list[Any] = [None]
        seen: dict[str, int] = {}
        others: dict[str, Other] = {}
        shapes: dict[str, list[tuple[int, ...]]] = {}  # each module's output shapes, in call order: the graph's sizes
        if self._graph is None:  # traced before any hook is set
            from equivcheck.modelcheck.torch_trace import trace

            self._graph = trace(self.model)

        def hook(module: Any, args: tuple, output: Any) -> None:
            found = self._config(module)
            if found is None and (held := _own_weights(module)):
                name = self._names.get(id(module), type(module).__name__)
                others.setdefault(name, Other(name or type(module).__name__, type(module).__name__, held, len(records)))
            if found is not None and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                kind, cfg = found
                name = self._names.get(id(module), type(module).__name__)
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    name = f"{name}#{seen[name]}"
                xin, y = args[0], output
                weight = getattr(module, "weight", None)
                bias = getattr(module, "bias", None)
                rec = Linear(name, "torch", kind,
                             _torch_numpy(weight, copy=False) if weight is not None else np.ones(xin.shape[-1 if kind == "layernorm" else 1]),
                             None if bias is None else _torch_numpy(bias, copy=False),
                             _torch_numpy(xin), _torch_numpy(y) if outputs else np.empty(0), cfg, layer=module,
                             index=len(records))
                if kind == "layernorm":
                    per_position(rec)
                if kind == "dense":
                    per_position(rec)
                    if xin.ndim == 2 and last_map[0] is not None:
                        rec.map_before = _torch_numpy(last_map[0])
                        rec.map_letters = conv_letters(last_map[0].ndim - 2, CHANNELS_FIRST)
                records.append(rec)
            if isinstance(output, torch.Tensor):
                shapes.setdefault(self._names.get(id(module), ""), []).append(tuple(output.shape))
                if output.ndim >= 3:
                    last_map[0] = output

        from equivcheck.modelcheck.sequence_capture import torch_sequence_kind, torch_sequence_records

        def sequence_hook(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            name = self._names.get(id(module), type(module).__name__)
            found = torch_sequence_records(module, name, args, kwargs, output, len(records))
            if isinstance(found, str):  # a recurrent or attention layer no spec describes: why, by name
                others.setdefault(name, Other(name or type(module).__name__, type(module).__name__,
                                              _own_weights(module) + sum(_own_weights(m) for m in module.modules()
                                                                         if m is not module), len(records), found))
                return
            seen[name] = seen.get(name, 0) + 1
            for rec in found:  # one per stacked layer ("lstm[0]", "lstm[1]"; "lstm#2[0]" on the second call)
                if seen[name] > 1:
                    rec.name = f"{name}#{seen[name]}{rec.name[len(name):]}"
                records.append(rec)

        sequence = [m for m in self.model.modules() if torch_sequence_kind(m) is not None]
        inside = {id(m) for q in sequence for m in q.modules()}
        hooks = [m.register_forward_hook(hook) for m in self.model.modules() if id(m) not in inside
                 and (not list(m.children()) or self._config(m) is not None or _own_weights(m))]
        hooks += [m.register_forward_hook(sequence_hook, with_kwargs=True) for m in sequence]
        if x.dtype.name == "bfloat16":
            x = x.astype(np.float32)
        try:
            with torch.no_grad():
                y = self.model(torch.as_tensor(x, dtype=self._tdtype, device=self._device))
        except EquivcheckError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.role} model {self.name} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"{self.role} model {self.name} returns {type(y).__name__}: expected one tensor")
        for rec in records:
            resolve_layout(rec)
        self._graph_layouts(records, shapes, tuple(x.shape))
        ran = {r.config.get("module", r.name.split("#")[0]) for r in records} | set(others)  # a stack's layers: its module
        for name, module in self.model.named_modules():
            if any(name.startswith(self._names[id(m)] + ".") for m in sequence):  # attention's out_proj: counted in it
                continue
            if name not in ran and (held := _own_weights(module) if module not in sequence else
                                    sum(_own_weights(m) for m in module.modules())):
                kind = type(module).__name__
                others[name] = Other(name or kind, kind, held, -1)
        self.others = outermost(list(others.values()))
        return _torch_numpy(y), records

    def _graph_layouts(self, records: list[Linear], shapes: dict[str, list[tuple[int, ...]]],
                       input_shape: tuple[int, ...]) -> None:
        """Each flattened dense input's layout as the traced graph gives it; where the graph does not say (or cannot
        be traced), the layout judged from the captured activations stays. Either way the notes say which."""
        from equivcheck.modelcheck.torch_trace import dense_layouts

        dense = [r for r in records if r.kind == "dense" and "sequence" not in r.config]
        if not dense:
            return
        notes = []
        if isinstance(self._graph, str):
            notes.append(f"{self.role} torch model {self.name} not traced: {self._graph}; layout judged from captured "
                         "activations")
        else:
            kinds: dict[int, str | None] = {}

            def kind_of(module: Any) -> str | None:
                if id(module) not in kinds:
                    found = self._config(module)
                    kinds[id(module)] = None if found is None else found[0]
                return kinds[id(module)]

            found = dense_layouts(self._graph, input_shape, shapes, kind_of)
            for rec in dense:
                got = found.get(rec.name)
                if got is None:
                    continue
                seen = rec.layout
                if got.layout is None:
                    if seen is not None and not seen.is_flat:  # plain features need no saying
                        notes.append(f"{self.role} {rec.name}: not traced ({got.how}); layout judged from captured "
                                     f"activations ({seen.describe()})")
                elif seen is not None and not seen.is_flat and seen != got.layout:
                    notes.append(f"{self.role} {rec.name}: the graph gives {got.how} but the captured activations show "
                                 f"{seen.describe()}: the activations' layout used")
                else:
                    rec.layout = got.layout
                    if not got.layout.is_flat:
                        notes.append(f"{self.role} {rec.name} reads {got.how}: traced from the graph (torch.fx)")
        self.notes.extend(n for n in notes if n not in self.notes)

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            t = torch.from_numpy(np.require(x.astype(np.float32) if x.dtype.name == "bfloat16" else x, requirements=["C", "W"]))
            return _torch_numpy(layer.layer(t.to(dtype=self._tdtype, device=self._device)))

    def magnitude_backend(self) -> str:
        return "torch"


def _own_weights(module: Any) -> int:
    """Parameters and floating-point buffers (batch-norm statistics) a torch module holds itself; a buffer of one
    value (a constant an exporter's converter kept, such as a scale) is not counted, as in the ONNX adapter."""
    held = sum(int(p.numel()) for p in module.parameters(recurse=False))
    return held + sum(int(b.numel()) for b in module.buffers(recurse=False) if b.is_floating_point() and b.numel() > 1)


def per_position(rec: Linear) -> None:
    """A dense layer applied along the last axis of a larger tensor: one row per position."""
    if rec.x.ndim > 2:
        rec.x = rec.x.reshape(-1, rec.x.shape[-1])
        if rec.y.size:
            rec.y = rec.y.reshape(-1, rec.y.shape[-1])



def variable_values(variable: Any) -> np.ndarray:
    """A Keras or TensorFlow variable's values, read-only and without a copy where the framework allows
    (``np.asarray`` of a variable copies it: 0.46 s for VGG16's fc6)."""
    v = getattr(variable, "value", None)
    v = v() if callable(v) else v if v is not None else variable  # tf.Variable.value() / KerasVariable.value
    read = getattr(v, "value", None)
    if callable(read):  # the tf.Variable under a Keras variable
        v = read()
    return np.asarray(v)

def resolve_layout(rec: Linear) -> None:
    """The input layout of a captured layer: conv from its data format, dense from the map it flattened."""
    if "sequence" in rec.config:  # a recurrent or attention layer: (batch, time, features), no map layout
        return
    if rec.kind != "dense":
        df = rec.config["data_format"]
        shape = rec.x.shape[1:]
        canon = shape if df == CHANNELS_FIRST else (shape[-1], *shape[:-1])
        rec.layout = Layout(tuple(int(s) for s in canon), letters=conv_letters(len(shape) - 1, df))
        return
    order = None
    if rec.map_before is not None:
        order = flatten_order(rec.map_before, rec.map_letters, rec.x)
    if order is None:
        rec.layout = Layout((int(rec.x.shape[1]),))
        return
    sizes = dict(zip(rec.map_letters, rec.map_before.shape[1:]))
    canon = "C" + spatial_letters(len(rec.map_letters) - 1)
    rec.layout = Layout(tuple(int(sizes[a]) for a in canon), flatten=order)


# -- Keras ---------------------------------------------------------------------------------
_KERAS_SHAPE_ONLY = {"Flatten", "Reshape", "Permute", "Transpose", "Squeeze", "ExpandDims", "Dropout", "Identity",
                     "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout"}


_KERAS_NORMS = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm", "GroupNormalization": "groupnorm"}


class KerasAdapter(Adapter):
    framework = backend = "keras"
    label = "Keras"
    module_name = "keras"  # the Keras package whose classes capture and replay (tf_keras: Keras 2)

    def __init__(self, model: Any, role: str) -> None:
        super().__init__(model, role)
        import importlib

        self._keras = keras = importlib.import_module(self.module_name)
        self.name = model.name
        policy = model.dtype_policy
        computing = [layer.dtype_policy.compute_dtype for layer in getattr(model, "layers", []) if layer.weights]
        self.dtype = str(computing[0] if computing else policy.compute_dtype)
        if not getattr(model, "built", True) or not _has_inputs(model):
            raise ModelError(f"{role} Keras model {model.name!r} is not built: give it an Input or call it once on data")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelError(f"{role} Keras model {model.name!r} has {len(model.inputs)} inputs and "
                             f"{len(model.outputs)} outputs: expected one of each")
        self._inputs: dict[int, Any] = {}  # layer id -> its input in the traced graph, where not layer.input
        if any(isinstance(layer, keras.Model) for layer in model.layers):
            self.model = model = self._flatten(model)
        formats = [layer.get_config().get("data_format") for layer in model.layers]
        formats = [f for f in formats if f in (CHANNELS_FIRST, CHANNELS_LAST)]
        self.data_format = formats[0] if formats else keras.backend.image_data_format()
        self.has_layout = bool(formats)
        self._why: dict[int, str] = {}  # layer id -> why a recurrent or attention layer is not checked
        self._linear = [(layer, *found) for layer in model.layers if (found := self._config(layer)) is not None]
        self._capture = None
        linear, before = {id(layer) for layer, *_ in self._linear}, 0
        for layer in model.layers:
            if id(layer) in linear:
                before += 1
            elif held := sum(int(math.prod(w.shape)) for w in layer.weights):
                self.others.append(Other(layer.name, type(layer).__name__, held, before, self._why.get(id(layer), "")))

    def cast(self, dtype: str) -> Any:
        """The model rebuilt from its config with every layer under a ``dtype`` policy, its weights cast."""
        keras = self._keras

        def clone(layer: Any) -> Any:
            return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

        try:
            model = keras.models.clone_model(self.model, clone_function=clone)
            model.set_weights([np.asarray(w).astype(dtype) for w in self.model.get_weights()])
        except Exception as exc:
            raise ModelError(f"{self.role} Keras model {self.name!r} cannot be rebuilt in {dtype} from its config "
                             f"({first_line(exc)}): build it under keras.config.set_dtype_policy({dtype!r})") from None
        self.notes.append(f"{self.role} {self.label} model {self.name!r} rebuilt in {dtype} from its config, its weights cast")
        return model

    def _flatten(self, model: Any) -> Any:
        """A model nesting models (keras-hub's backbone + head) as one functional chain sharing its layers.

        Only a chain of single-input layers can be re-traced this way; the chain is checked to
        compute what the model does before it stands in for it.
        """
        keras = self._keras

        def leaves(m: Any) -> Any:
            for layer in m.layers:
                if isinstance(layer, keras.Model):
                    yield from leaves(layer)
                elif not isinstance(layer, keras.layers.InputLayer):
                    yield layer

        inner = next(layer.name for layer in model.layers if isinstance(layer, keras.Model))
        refuse = (f"{self.role} Keras model {model.name!r} nests model {inner!r} and is not a chain of single-input "
                  "layers: flatten it into one functional model")
        x = y = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
        try:
            for layer in leaves(model):
                self._inputs[id(layer)] = y
                y = layer(y)
            flat = keras.Model(x, y, name=model.name)
            probe = np.random.default_rng(0).standard_normal((1, *flat.inputs[0].shape[1:])).astype(np.float32)
            same = np.allclose(np.asarray(flat(probe, training=False)), np.asarray(model(probe, training=False)),
                               rtol=1e-5, atol=1e-6)
        except Exception as exc:
            raise ModelError(f"{refuse} ({first_line(exc)})") from None
        if not same:
            raise ModelError(f"{refuse} (its layers in order do not compute what it does)")
        self.notes.append(f"{self.role} nests model {inner!r}: traced as one chain of its {len(flat.layers) - 1} layers")
        return flat

    def input_shape(self) -> tuple[int, ...] | None:
        shape = tuple(self.model.inputs[0].shape[1:])
        return None if any(s is None for s in shape) else tuple(int(s) for s in shape)

    def _config(self, layer: Any) -> tuple[str, dict[str, Any]] | None:
        from equivcheck.modelcheck.sequence_capture import keras_sequence

        sequence = keras_sequence(layer, retraced=id(layer) in self._inputs)
        if isinstance(sequence, str):
            self._why[id(layer)] = sequence
            return None
        if sequence is not None:
            return sequence
        kind = type(layer).__name__
        cfg = layer.get_config()
        if kind in _KERAS_NORMS:
            return self._norm(layer, kind, cfg)
        if kind == "Dense":
            return "dense", {"units": cfg["units"], "kernel_layout": "IO", "activation": cfg.get("activation")}
        match = re.fullmatch(r"(Conv|DepthwiseConv)([123])D(Transpose)?", kind)
        if match is None:
            return None
        rank = int(match.group(2))
        base = match.group(1) + ("Transpose" if match.group(3) else "")
        letters = "DHW"[3 - rank:]
        kernel = _kernel(layer)
        ks = tuple(int(s) for s in kernel.shape[:rank])
        df = cfg.get("data_format") or self._keras.backend.image_data_format()
        padding = cfg.get("padding", "valid")
        if padding not in ("valid", "same"):
            raise ModelError(f"{self.role} layer {layer.name!r} ({kind}) has padding={padding!r}: expected 'valid' or 'same'")
        common = {"kernel_size": ks, "stride": _tuple(cfg["strides"], rank), "dilation": _tuple(cfg.get("dilation_rate", 1), rank), "data_format": df, "padding": padding,
                  "activation": cfg.get("activation")}
        if base == "Conv":
            groups = int(cfg.get("groups", 1))
            depthwise = groups > 1 and int(kernel.shape[-2]) == 1
            return "depthwise" if depthwise else "conv", {
                **common, "in_channels": int(kernel.shape[-2]) * groups, "out_channels": int(kernel.shape[-1]),
                "groups": groups, "kernel_layout": letters + "IO"}
        if base == "DepthwiseConv":
            c, m = int(kernel.shape[-2]), int(kernel.shape[-1])
            return "depthwise", {**common, "in_channels": c, "out_channels": c * m, "groups": c,
                                 "kernel_layout": letters + "IM"}
        out, cin = int(kernel.shape[-2]), int(kernel.shape[-1])
        op = cfg.get("output_padding")
        op = (0,) * rank if op is None else (tuple(op) if not isinstance(op, int) else (op,) * rank)
        if padding == "same":
            strides = common["stride"]
            if any((k - s) % 2 or k < s for k, s in zip(ks, strides)) or any(op):
                raise ModelError(f"{self.role} layer {layer.name!r} ({kind}) uses padding='same' with kernel {ks} and "
                                 f"strides {strides}: only kernel - stride even and >= 0 is described")
            common["padding"] = tuple((k - s) // 2 for k, s in zip(ks, strides))
        else:
            common["padding"] = (0,) * rank
        return "conv_transpose", {**common, "in_channels": cin, "out_channels": out, "groups": 1,
                                  "kernel_layout": letters + "OI", "output_padding": op}

    def _norm(self, layer: Any, kind: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """A norm layer over one axis (its data format fixed at run time from the input's rank); else None."""
        from equivcheck.modelcheck.norms import norm_config

        axis = cfg.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                return None
            axis = axis[0]
        if cfg.get("rms_scaling") or cfg.get("synchronized") or not isinstance(axis, int):
            return None
        out = norm_config(eps=cfg.get("epsilon", 1e-3), groups=cfg.get("groups", 1), data_format=CHANNELS_LAST,
                          keep=cfg.get("momentum") if kind == "BatchNormalization" else None)
        out["axis"] = axis
        return _KERAS_NORMS[kind], out

    def _norm_record(self, layer: Any, kind: str, cfg: dict[str, Any], xin: np.ndarray, i: int) -> Linear:
        cfg = dict(cfg)
        axis = cfg.pop("axis") % xin.ndim
        if kind == "layernorm" and axis != xin.ndim - 1:
            raise ModelError(f"{self.role} layer {layer.name!r} normalises axis {axis} of a {xin.ndim}-D input: "
                             "only the last axis is checked")
        if axis not in (1, xin.ndim - 1):
            raise ModelError(f"{self.role} layer {layer.name!r} normalises axis {axis} of a {xin.ndim}-D input: "
                             "expected the channel axis, 1 or -1")
        cfg["data_format"] = CHANNELS_LAST if axis == xin.ndim - 1 else CHANNELS_FIRST
        gamma, beta = getattr(layer, "gamma", None), getattr(layer, "beta", None)
        if kind == "batchnorm":
            cfg["mean"], cfg["var"] = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
        channels = int(xin.shape[axis])
        rec = Linear(layer.name, "keras", kind, np.asarray(gamma) if gamma is not None else np.ones(channels),
                     None if beta is None else np.asarray(beta), xin, np.empty(0), cfg, layer=layer, index=i)
        if kind == "layernorm":
            per_position(rec)
        return rec

    def _build_capture(self) -> Any:
        keras = self._keras
        outputs = []
        for layer, kind, cfg in self._linear:
            if "sequence" in cfg:  # a recurrent or attention layer: its inputs, then its output
                outputs.extend(cfg["tensors"])
                continue
            try:
                tensor = self._inputs[id(layer)] if id(layer) in self._inputs else layer.input  # noqa: SIM401 - .input raises for a re-traced layer
            except (AttributeError, ValueError) as exc:
                raise ModelError(f"{self.role} layer {layer.name!r} is used more than once or has several inputs: "
                                 f"{exc}") from None
            outputs.append(tensor)
            outputs.append(_map_tensor(tensor, self.traced_input) if kind == "dense" and len(tensor.shape) == 2 else tensor)
        outputs.append(self.model.outputs[0])
        return keras.Model(self.model.inputs[0], outputs)

    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        if self._capture is None:
            self._capture = self._build_capture()
        try:
            values = self._capture(x, training=False)
        except EquivcheckError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.role} model {self.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        values = [np.asarray(v) for v in values]
        records = []
        at = 0
        for i, (layer, kind, cfg) in enumerate(self._linear):
            if "sequence" in cfg:
                from equivcheck.modelcheck.sequence_capture import keras_sequence_record

                records.append(keras_sequence_record(layer, kind, cfg, values[at:at + len(cfg["tensors"])], i))
                at += len(cfg["tensors"])
                continue
            xin, map_ = values[at], values[at + 1]
            at += 2
            if "eps" in cfg:  # a norm layer
                rec = self._norm_record(layer, kind, cfg, xin, i)
                resolve_layout(rec)
                if outputs:
                    rec.y = self.replay(rec, rec.x)
                records.append(rec)
                continue
            weights = [variable_values(w) for w in (_kernel(layer), getattr(layer, "bias", None)) if w is not None]
            rec = Linear(layer.name, "keras", kind, weights[0], weights[1] if len(weights) > 1 else None, xin,
                         np.empty(0), cfg, layer=layer, index=i)
            if kind == "dense":
                per_position(rec)
                if map_ is not xin and map_.ndim >= 3 and math.prod(map_.shape[1:]) == rec.x.shape[-1]:
                    rec.map_before = map_
                    rec.map_letters = conv_letters(map_.ndim - 2, self.data_format)
            resolve_layout(rec)
            if outputs:
                rec.y = self.replay(rec, rec.x)
            records.append(rec)
        return values[-1], records

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        keras = self._keras
        real = layer.layer
        fused = getattr(real, "activation", None)
        try:
            if fused is not None:
                real.activation = keras.activations.linear
            if "eps" in layer.config:  # a norm layer: inference mode, its running statistics
                return np.asarray(real(x, training=False))
            return np.asarray(real(x))
        except Exception as exc:
            raise ModelError(f"{self.role} layer {layer.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        finally:
            if fused is not None:
                real.activation = fused

    def magnitude_backend(self) -> str:
        return "torch" if "torch" in sys.modules else "numpy"

    def traced_input(self, op: Any, node: Any) -> Any | None:
        """The one tensor a shape-only layer ``op`` reads at ``node`` (tracing a Dense input back to its map); else None."""
        if type(op).__name__ not in _KERAS_SHAPE_ONLY:
            return None
        inputs = node.input_tensors
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]  # tf_keras: one tensor, not a list
        return inputs[0] if len(inputs) == 1 else None


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    return (int(value),) * rank if isinstance(value, int) else tuple(int(v) for v in value)


def _has_inputs(model: Any) -> bool:
    with contextlib.suppress(AttributeError, ValueError):
        return bool(model.inputs)
    return False


def _kernel(layer: Any) -> Any:
    """A Keras layer's kernel (tf_keras names a depthwise conv's ``depthwise_kernel``)."""
    kernel = getattr(layer, "kernel", None)
    return kernel if kernel is not None else layer.depthwise_kernel


def _map_tensor(tensor: Any, traced_input: Any) -> Any:
    """The tensor a Dense input was flattened from: back through shape-only layers and ops."""
    current = tensor
    for _ in range(16):
        history = getattr(current, "_keras_history", None)
        if history is None:
            break
        op = history[0]
        nodes = getattr(op, "_inbound_nodes", [])
        before = traced_input(op, nodes[history[1]]) if len(nodes) > history[1] else None
        if before is None:
            break
        current = before
    width = tensor.shape[-1]  # None where a graph reshapes to (batch, -1) (nobuco): the captured values decide
    fits = None not in tuple(current.shape[1:]) and (width is None or math.prod(current.shape[1:]) == width)
    return current if len(current.shape) >= 3 and fits else tensor

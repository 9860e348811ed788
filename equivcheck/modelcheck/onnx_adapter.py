"""ONNX models for ``check_models``: an ``onnx.ModelProto``, a ``.onnx`` path or an ``InferenceSession``.

Linear nodes, in the graph's topological order: ``Gemm`` (kernel ``B`` as stored: layout ``IO``,
or ``OI`` with ``transB=1``; ``alpha``/``beta`` folded into kernel and bias), ``MatMul`` with a
stored 2-D ``B`` (``IO``) and the bias of the one ``Add`` reading it, ``Conv`` (``OI`` + spatial)
and ``ConvTranspose`` (``IO`` + spatial), 1-D to 3-D, channels first, weights read from the
initializers. One ONNX Runtime session (CPU) runs a copy of the model in which each linear
node's input, output, and the map a dense input was flattened from, are graph outputs too; a
node is replayed as a model of its own. onnx and onnxruntime are imported when such a model is given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.backends.onnxruntime import node_attribute, read_onnx_model
from equivcheck.modelcheck.adapters import Adapter, ModelError, first_line, outermost, per_position, resolve_layout
from equivcheck.modelcheck.layers import Linear, Other, conv_letters
from equivcheck.specs import CHANNELS_FIRST

__all__ = ["OnnxAdapter", "is_onnx"]

_DTYPES = {1: "float32", 10: "float16", 11: "float64"}  # TensorProto FLOAT, FLOAT16, DOUBLE
_SHAPE_ONLY = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
_NORMS = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm", "GroupNormalization": "groupnorm"}
# ops whose stored float inputs are sizes, scales of a resize or fill values, not learned parameters
_NOT_PARAMETERS = {"Resize", "Upsample", "Pad", "Clip", "ConstantOfShape", "Reshape", "Expand", "Tile", "Slice",
                   "Range", "Shape", "Cast", "Gather"}


def is_onnx(model: Any) -> bool:
    """A ``ModelProto``, an ``InferenceSession`` (of modules already imported) or a path ending in ``.onnx``."""
    if isinstance(model, (str, os.PathLike)):
        return str(os.fspath(model)).lower().endswith(".onnx")
    onnx, ort = sys.modules.get("onnx"), sys.modules.get("onnxruntime")
    return bool((onnx is not None and isinstance(model, onnx.ModelProto))
                or (ort is not None and isinstance(model, ort.InferenceSession)))


@dataclass
class _Node:
    """One linear node (a MatMul with its bias Add) and the constants it reads."""

    name: str
    kind: str
    nodes: list[Any]  # the NodeProtos run by a replay, in order
    x: str  # data input
    y: str  # output (the Add's for a MatMul with a bias)
    kernel: np.ndarray  # as the record holds it (Gemm's alpha folded in)
    bias: np.ndarray | None
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # the nodes' constant inputs, as stored
    config: dict[str, Any] = field(default_factory=dict)  # a dense node's (a conv's depends on its input size)
    map_: str = ""  # for a dense node: the tensor its input was reshaped from


def _load(model: Any, role: str) -> tuple[Any, str]:
    """The ModelProto and a name for it: its file's stem, else its graph's name."""
    proto, _ = read_onnx_model(model, role, error=ModelError)
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "_model_path", None)
    return proto, os.path.splitext(os.path.basename(os.fspath(path)))[0] if path else proto.graph.name or "model"


def _topological(graph: Any, known: set[str], role: str) -> list[Any]:
    """The graph's nodes in execution order (the stored order where it is already topological)."""
    ready, order, waiting = set(known), [], list(graph.node)
    while waiting:
        left = [n for n in waiting if not all(i == "" or i in ready for i in n.input)]
        done = [n for n in waiting if all(i == "" or i in ready for i in n.input)]
        if not done:
            stuck = left[0]
            raise ModelError(f"{role} ONNX graph: node {stuck.name or stuck.op_type!r} reads "
                             f"{next(i for i in stuck.input if i and i not in ready)!r}, which no node computes "
                             "(or a cycle): expected a valid acyclic graph")
        for n in done:
            order.append(n)
            ready.update(n.output)
        waiting = left
    return order


class OnnxAdapter(Adapter):
    framework = backend = "onnxruntime"
    label = "ONNX"
    recast = "a model exported in {}"
    data_format = CHANNELS_FIRST

    def __init__(self, model: Any, role: str) -> None:
        super().__init__(model, role)
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelError(f"{role} ONNX model: checking it needs onnx and onnxruntime: "
                             "pip install 'equivcheck[onnx]'") from None
        self.proto, self.name = _load(model, role)
        graph = self.proto.graph
        stored = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in stored]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelError(f"{role} ONNX model {self.name!r} has {len(inputs)} inputs and {len(graph.output)} "
                             "outputs: expected one of each")
        self._input, self._output = inputs[0], graph.output[0].name
        elem = self._input.type.tensor_type.elem_type
        if elem not in _DTYPES:
            raise ModelError(f"{role} ONNX model {self.name!r} input {self._input.name!r} has element type={elem}: "
                             "expected float32, float16 or float64")
        self.dtype = _DTYPES[elem]
        self._order = _topological(graph, stored | {self._input.name}, role)
        self._consts = self._constants()
        self._producer = {o: n for n in self._order for o in n.output}
        self._dynamic = self._data_dependent()
        self._linear = self._find_linear()
        self.others = self._find_others()
        self._session: Any = None
        self._replays: dict[str, Any] = {}

    # -- the graph -----------------------------------------------------------------------------
    def _constants(self) -> dict[str, np.ndarray]:
        from onnx import numpy_helper

        consts = {}
        try:
            for t in self.proto.graph.initializer:
                consts[t.name] = numpy_helper.to_array(t)
            for n in self._order:
                value = node_attribute(n, "value", None) if n.op_type == "Constant" else None
                if value is not None and not isinstance(value, (int, float, str, list)):
                    consts[n.output[0]] = numpy_helper.to_array(value)
        except Exception as exc:
            raise ModelError(f"{self.role} ONNX model {self.name!r} holds a constant that cannot be read: "
                             f"{first_line(exc)}") from None
        return consts

    def _data_dependent(self) -> set[str]:
        """Names of tensors computed from the model's input."""
        dynamic = {self._input.name}
        for n in self._order:
            if any(i in dynamic for i in n.input):
                dynamic.update(n.output)
        return dynamic

    def _label(self, node: Any) -> str:
        return node.name or f"{node.op_type}:{node.output[0]}"

    def _const(self, name: str, node: Any, what: str) -> np.ndarray:
        """A stored constant (through Identity nodes), or one line naming what computes it."""
        current = name
        while current not in self._consts:
            producer = self._producer.get(current)
            if producer is None:
                raise ModelError(f"{self.role} ONNX node {self._label(node)!r} ({node.op_type}) reads its {what} "
                                 f"{name!r} from a graph input: expected an initializer")
            if producer.op_type != "Identity":
                raise ModelError(f"{self.role} ONNX node {self._label(node)!r} ({node.op_type}) reads its {what} "
                                 f"{name!r} computed in the graph by node {self._label(producer)!r} "
                                 f"({producer.op_type}): expected an initializer (fold constants first)")
            current = producer.input[0]
        return self._consts[current]

    def _map_of(self, name: str) -> str:
        """The tensor a dense input was reshaped from, back through shape-only nodes."""
        current = name
        while (p := self._producer.get(current)) is not None and p.op_type in _SHAPE_ONLY and p.domain in ("", "ai.onnx"):
            current = p.input[0]
        return current if current != name else ""

    def _find_linear(self) -> list[_Node]:
        found: list[_Node] = []
        readers: dict[str, list[Any]] = {}
        for n in self._order:
            for i in set(n.input):
                readers.setdefault(i, []).append(n)
        seen: dict[str, int] = {}
        for n in self._order:
            if n.domain in ("", "ai.onnx") and n.op_type in _NORMS:
                norm = self._norm(n)
                if norm is not None:
                    seen[norm.name] = seen.get(norm.name, 0) + 1
                    found.append(norm)
                continue
            if n.domain not in ("", "ai.onnx") or n.op_type not in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
                continue
            if n.op_type == "MatMul" and (len(n.input) < 2 or n.input[1] in self._dynamic):
                continue  # a product of two computed tensors (attention), not a layer
            rec = self._gemm(n) if n.op_type == "Gemm" else self._matmul(n, readers) if n.op_type == "MatMul" \
                else self._conv(n)
            seen[rec.name] = seen.get(rec.name, 0) + 1
            if seen[rec.name] > 1:
                rec.name = f"{rec.name}#{seen[rec.name]}"
            found.append(rec)
        return found

    def _norm(self, n: Any) -> _Node | None:
        """A BatchNormalization (inference), LayerNormalization over the last axis or GroupNormalization (a scale
        per channel, opset 21) node; None for one that is not checked that way (left to the unchecked list)."""
        from equivcheck.modelcheck.norms import norm_config

        kind = _NORMS[n.op_type]
        eps = float(node_attribute(n, "epsilon", 1e-5))
        try:
            consts = {i: self._const(i, n, what) for i, what in zip(n.input[1:], ("scale", "bias", "mean", "var")) if i}
        except ModelError:
            return None
        values = [consts.get(i) for i in n.input[1:]]
        if kind == "batchnorm":
            if node_attribute(n, "training_mode", 0) or len(values) != 4:
                return None
            scale, bias, mean, var = values
            cfg = norm_config(mean=mean, var=var, eps=eps, data_format=CHANNELS_FIRST,
                              keep=float(node_attribute(n, "momentum", 0.9)))
        elif kind == "layernorm":
            if node_attribute(n, "axis", -1) != -1 or not values or values[0] is None or values[0].ndim != 1:
                return None
            scale, bias = values[0], values[1] if len(values) > 1 else None
            cfg = norm_config(eps=eps, data_format=CHANNELS_FIRST)
        else:
            groups = int(node_attribute(n, "num_groups", 1))
            scale, bias = values[0], values[1] if len(values) > 1 else None
            if scale is None or (scale.size == groups and groups > 1 and not self._opset_at_least(21)):
                return None  # opset 18 scales per group: another layer than torch's
            cfg = norm_config(eps=eps, groups=groups, data_format=CHANNELS_FIRST)
        return _Node(self._label(n), kind, [n], n.input[0], n.output[0], np.asarray(scale).reshape(-1),
                     None if bias is None else np.asarray(bias).reshape(-1), consts, cfg)

    def _opset_at_least(self, version: int) -> bool:
        return any(o.domain in ("", "ai.onnx") and o.version >= version for o in self.proto.opset_import)

    def _find_others(self) -> list[Other]:
        """Nodes other than the linear ones that read stored floating-point tensors (batch norm, LSTM, PRelu...)."""
        linear = {id(n) for node in self._linear for n in node.nodes}
        first = {id(node.nodes[0]) for node in self._linear}
        found, before = [], 0
        for n in self._order:
            if id(n) in linear:
                before += id(n) in first
                continue
            if n.op_type in _NOT_PARAMETERS or n.op_type == "Constant":
                continue
            held = sum(int(self._consts[i].size) for i in set(n.input)
                       if i in self._consts and self._consts[i].dtype.kind == "f" and self._consts[i].size > 1)
            if held:
                found.append(Other(self._label(n), n.op_type, held, before))
        return outermost(found)

    def _refuse(self, n: Any, what: str) -> ModelError:
        return ModelError(f"{self.role} ONNX node {self._label(n)!r} ({n.op_type}) {what}")

    def _gemm(self, n: Any) -> _Node:
        if node_attribute(n, "transA", 0):
            raise self._refuse(n, "has transA=1: expected transA=0 (the batch first)")
        b = self._const(n.input[1], n, "weight B")
        if b.ndim != 2:
            raise self._refuse(n, f"has a weight of shape={b.shape}: expected 2-D")
        trans = bool(node_attribute(n, "transB", 0))
        units = int(b.shape[0] if trans else b.shape[1])
        consts = {n.input[1]: b}
        alpha, beta = float(node_attribute(n, "alpha", 1.0)), float(node_attribute(n, "beta", 1.0))
        bias = None
        if len(n.input) > 2 and n.input[2]:
            c = consts[n.input[2]] = self._const(n.input[2], n, "bias C")
            if c.size not in (1, units):
                raise self._refuse(n, f"has a bias C of shape={c.shape}: expected one value per output ({units})")
            bias = np.broadcast_to(c.reshape(-1) * c.dtype.type(beta), (units,)).copy()
        kernel = b * b.dtype.type(alpha) if alpha != 1 else b
        return _Node(self._label(n), "dense", [n], n.input[0], n.output[0], kernel, bias, consts,
                     {"units": units, "kernel_layout": "OI" if trans else "IO"}, self._map_of(n.input[0]))

    def _matmul(self, n: Any, readers: dict[str, list[Any]]) -> _Node:
        w = self._const(n.input[1], n, "weight")
        if w.ndim != 2:
            raise self._refuse(n, f"has a weight of shape={w.shape}: expected 2-D (in, out)")
        units = int(w.shape[1])
        nodes, y, bias, consts = [n], n.output[0], None, {n.input[1]: w}
        after = readers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add" and after[0].domain in ("", "ai.onnx"):
            add = after[0]
            other = [i for i in add.input if i != n.output[0]]
            if len(other) == 1 and other[0] not in self._dynamic:
                b = self._const(other[0], add, "bias")
                if b.size == units:
                    nodes, y, bias = [n, add], add.output[0], b.reshape(-1)
                    consts[other[0]] = b
        return _Node(self._label(n), "dense", nodes, n.input[0], y, w, bias, consts,
                     {"units": units, "kernel_layout": "IO"}, self._map_of(n.input[0]))

    def _conv(self, n: Any) -> _Node:
        w = self._const(n.input[1], n, "weight W")
        if not 3 <= w.ndim <= 5:
            raise self._refuse(n, f"has a weight of shape={w.shape}: expected a 1-D to 3-D kernel (out, in/group, *k)")
        consts = {n.input[1]: w}
        bias = None
        if len(n.input) > 2 and n.input[2]:
            bias = consts[n.input[2]] = self._const(n.input[2], n, "bias B")
        node = _Node(self._label(n), "conv", [n], n.input[0], n.output[0], w, bias, consts)
        node.kind, _ = self._conv_config(node, None)
        return node

    def _conv_config(self, node: _Node, spatial: tuple[int, ...] | None) -> tuple[str, dict[str, Any]]:
        """Kind and configuration, as :class:`TorchAdapter` gives them; ``spatial`` sizes SAME padding."""
        n, w = node.nodes[0], node.kernel
        rank, transposed, groups = w.ndim - 2, n.op_type == "ConvTranspose", int(node_attribute(n, "group", 1))
        ks = tuple(int(k) for k in w.shape[2:])
        if tuple(node_attribute(n, "kernel_shape", ks)) != ks:
            raise self._refuse(n, f"has kernel_shape={tuple(node_attribute(n, 'kernel_shape', ()))} but a weight of "
                                  f"shape={w.shape}: expected them to agree")
        stride = tuple(int(s) for s in node_attribute(n, "strides", [1] * rank))
        dilation = tuple(int(d) for d in node_attribute(n, "dilations", [1] * rank))
        auto_pad = node_attribute(n, "auto_pad", "NOTSET")
        if auto_pad == "NOTSET":
            flat = [int(p) for p in node_attribute(n, "pads", [0] * (2 * rank))]
        elif auto_pad == "VALID":
            flat = [0] * (2 * rank)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:
            before, after = [], []
            for size, k, s, d in zip(spatial or (1,) * rank, ks, stride, dilation):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small, large = total // 2, total - total // 2
                before.append(small if auto_pad == "SAME_UPPER" else large)
                after.append(large if auto_pad == "SAME_UPPER" else small)
            flat = before + after
        else:
            raise self._refuse(n, f"has auto_pad={auto_pad!r}: expected NOTSET (explicit pads) or VALID")
        pairs = tuple(zip(flat[:rank], flat[rank:]))
        even = all(lo == hi for lo, hi in pairs)
        cfg: dict[str, Any] = {
            "in_channels": int(w.shape[0] if transposed else w.shape[1] * groups),
            "out_channels": int(w.shape[1] * groups if transposed else w.shape[0]),
            "kernel_size": ks, "stride": stride, "dilation": dilation, "groups": groups,
            "data_format": CHANNELS_FIRST, "padding": tuple(lo for lo, _ in pairs) if even else pairs,
            "kernel_layout": ("IO" if transposed else "OI") + "DHW"[3 - rank:],
        }
        if transposed:
            if node_attribute(n, "output_shape", None) is not None:
                raise self._refuse(n, "has output_shape=: expected explicit pads and output_padding")
            if not even:
                raise self._refuse(n, f"has uneven pads={tuple(flat)}: expected the same padding at both ends of an axis")
            cfg["output_padding"] = tuple(int(p) for p in node_attribute(n, "output_padding", [0] * rank))
            return "conv_transpose", cfg
        depthwise = groups == cfg["in_channels"] and cfg["in_channels"] > 1
        return ("depthwise" if depthwise else "conv"), cfg

    # -- running ---------------------------------------------------------------------------------
    def input_shape(self) -> tuple[int, ...] | None:
        dims = self._input.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
        return None if not dims or any(s < 1 for s in shape) else shape

    def fixed_batch(self) -> int | None:
        """The graph's fixed batch where a node bakes it in (a Reshape to a stored shape): the declared one then."""
        dims = self._input.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
            return None
        batch = int(dims[0].dim_value)
        baked = any(n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in self._consts
                    and self._consts[n.input[1]].size and int(self._consts[n.input[1]].reshape(-1)[0]) == batch
                    for n in self._order)
        return batch if baked else None

    def _session_on(self, proto: Any, what: str) -> Any:
        import onnxruntime as ort

        from equivcheck.backends.onnxruntime import PROVIDER, session_options

        try:
            return ort.InferenceSession(proto.SerializeToString(), session_options(ort), providers=[PROVIDER])
        except Exception as exc:
            raise ModelError(f"{self.role} ONNX model {self.name!r}: ONNX Runtime cannot load {what}: "
                             f"{first_line(exc)}") from None

    def _captures(self) -> list[str]:
        names = [self._output]
        for node in self._linear:
            names += [node.x, node.y] + ([node.map_] if node.map_ else [])
        return list(dict.fromkeys(names))

    def _capture_session(self, batch: int) -> Any:
        """The model with every captured tensor a graph output (the batch left open where it is fixed otherwise)."""
        import onnx

        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        graph = proto.graph
        declared = {o.name for o in graph.output}
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in self._captures() if name not in declared)
        first = next(i for i in graph.input if i.name == self._input.name).type.tensor_type.shape.dim
        if first and first[0].HasField("dim_value") and first[0].dim_value != batch:
            first[0].dim_param = "N"
            for o in graph.output:
                if o.type.tensor_type.shape.dim:
                    o.type.tensor_type.shape.dim[0].dim_param = "N"
            del graph.value_info[:]
        return self._session_on(proto, "its copy with the linear nodes' inputs and outputs as outputs")

    def _feed(self, x: np.ndarray) -> np.ndarray:
        from equivcheck.backends.base import np_dtype

        return np.ascontiguousarray(x, dtype=np_dtype(self.dtype))

    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        if self._session is None:
            self._session = self._capture_session(int(x.shape[0]))
        names = self._captures()
        try:
            values = dict(zip(names, self._session.run(names, {self._input.name: self._feed(x)})))
        except Exception as exc:
            raise ModelError(f"{self.role} ONNX model {self.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        records = []
        for i, node in enumerate(self._linear):
            xin = values[node.x]
            if node.kind in _NORMS.values():
                rec = Linear(node.name, self.framework, node.kind, node.kernel, node.bias, xin,
                             values[node.y] if outputs else np.empty(0), dict(node.config), layer=node, index=i)
                if node.kind == "layernorm":
                    per_position(rec)
                resolve_layout(rec)
                records.append(rec)
                continue
            if node.kind == "dense":
                kind, cfg = "dense", dict(node.config)
            else:
                kind, cfg = self._conv_config(node, tuple(int(s) for s in xin.shape[2:]))
            rec = Linear(node.name, self.framework, kind, node.kernel, node.bias, xin,
                         values[node.y] if outputs else np.empty(0), cfg, layer=node, index=i)
            if kind == "dense":
                per_position(rec)
                map_ = values.get(node.map_) if node.map_ else None
                if map_ is not None and map_.ndim >= 3 and rec.x.ndim == 2:
                    rec.map_before = map_
                    rec.map_letters = conv_letters(map_.ndim - 2, CHANNELS_FIRST)
            resolve_layout(rec)
            records.append(rec)
        return values[self._output], records

    def _node_session(self, node: _Node) -> Any:
        """``node`` alone (a MatMul with its Add): its constants as initializers, any input size."""
        import onnx
        from onnx import helper, numpy_helper

        elem = self._input.type.tensor_type.elem_type
        copies = []
        for n in node.nodes:
            copies.append(onnx.NodeProto())
            copies[-1].CopyFrom(n)
            del copies[-1].output[1:]
        inits = [numpy_helper.from_array(np.asarray(value), name) for name, value in node.consts.items()]
        graph = helper.make_graph(copies, "equivcheck_replay", [helper.make_tensor_value_info(node.x, elem, None)],
                                  [helper.make_tensor_value_info(node.y, elem, None)], initializer=inits)
        proto = helper.make_model(graph, opset_imports=list(self.proto.opset_import), producer_name="equivcheck")
        proto.ir_version = self.proto.ir_version
        return self._session_on(proto, f"node {node.name!r} alone")

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        node: _Node = layer.layer
        if node.name not in self._replays:
            self._replays[node.name] = self._node_session(node)
        try:
            return self._replays[node.name].run(None, {node.x: self._feed(x)})[0]
        except Exception as exc:
            raise ModelError(f"{self.role} ONNX node {node.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None

    def magnitude_backend(self) -> str:
        return "onnxruntime"

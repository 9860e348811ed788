"""Sides made of exported models: one linear node of an ONNX graph, one linear op of a TFLite model.

* :class:`OnnxSide` — an ``onnx.ModelProto``, a ``.onnx`` path or an ``onnxruntime.InferenceSession``
  holding one linear node (``Gemm``, ``MatMul`` with a constant weight and its bias ``Add``,
  ``Conv``, ``ConvTranspose``), or a node picked by name from a larger graph: ``(model, "NODE")``
  or ``"model.onnx:NODE"`` (``NODE`` is the node's name or its output's). The node, with its own
  attributes, becomes a model of its own whose weight and bias are graph inputs, run by ONNX
  Runtime (CPU EP): one session takes ``x``, the probe kernel and bias.
* :class:`TfliteSide` — a TFLite flatbuffer (``bytes`` or a ``.tflite`` path) with one
  ``FULLY_CONNECTED``, ``CONV_2D``, ``DEPTHWISE_CONV_2D`` or ``TRANSPOSE_CONV`` op. The whole
  model runs on the tflite backend's interpreter; each probe kernel is written into the weight's
  constant buffer in a copy of the flatbuffer, which a new interpreter then runs.

Geometry comes from the node's attributes and the shapes the model declares (ONNX: after shape
inference); the explore shape keywords fill in what is dynamic or missing. The frameworks are
imported only when such a model is given.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, SpecError, framework_message
from equivcheck.explore.sides import Side, dense_geometry
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, ConvSpec, Shape

__all__ = ["OnnxSide", "TfliteSide", "runtime_side", "split_model_path"]

ONNX_LINEAR = ("Gemm", "MatMul", "Conv", "ConvTranspose")
SUFFIXES = (".onnx", ".tflite")
_ONNX_DTYPES = {1: "float32", 11: "float64"}  # TensorProto FLOAT, DOUBLE


def split_model_path(text: str) -> tuple[str, str | None] | None:
    """``"m.onnx"`` → (path, None), ``"m.onnx:NODE"`` → (path, NODE); None when ``text`` names no model file."""
    if text.lower().endswith(SUFFIXES):
        return text, None
    head, sep, node = text.rpartition(":")
    if sep and node and head.lower().endswith(SUFFIXES):
        return head, node
    return None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SpecError(f"model file={path!r} cannot be read: {exc.strerror or type(exc).__name__}") from None


def runtime_side(obj: Any, shape: Shape) -> Side | None:
    """A side for an ONNX or TFLite model (path, bytes, object, or ``(model, NODE)``); None for anything else."""
    node = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], str) and _is_model(obj[0]):
        obj, node = obj
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str):
        split = split_model_path(obj)
        if split is None:
            return None
        path, from_path = split
        if node is not None and from_path is not None:
            raise SpecError(f"model={obj!r} names node {from_path!r} and a second NODE={node!r} is given: give one")
        node = node or from_path
        if path.lower().endswith(".tflite"):
            if node is not None:
                raise SpecError(f"model={obj!r}: a TFLite model is explored whole (one linear op), not by NODE")
            return TfliteSide(_read(path), shape, label=f"tflite {os.path.basename(path)}")
        return OnnxSide(path, shape, node=node)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if node is not None:
            raise SpecError("a TFLite model is explored whole (one linear op), not by NODE")
        return TfliteSide(bytes(obj), shape)
    if _is_onnx_object(obj):
        return OnnxSide(obj, shape, node=node)
    return None


def _is_onnx_object(obj: Any) -> bool:
    onnx, ort = sys.modules.get("onnx"), sys.modules.get("onnxruntime")
    return (onnx is not None and isinstance(obj, onnx.ModelProto)) or (
        ort is not None and isinstance(obj, ort.InferenceSession))


def _is_model(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike)) or _is_onnx_object(obj)


def _map_keywords(label: str, shape: Shape, declared: tuple[int | None, ...], rank: int) -> tuple[int, ...]:
    """The map's spatial size: as declared, else ``spatial=``; a given ``spatial`` must agree with a declared one."""
    if all(d is not None for d in declared):
        spatial = tuple(int(d) for d in declared)  # type: ignore[arg-type]
        if shape.spatial is not None and tuple(shape.spatial) != spatial:
            raise SpecError(f"{label}: spatial={tuple(shape.spatial)} but the model declares a map of {spatial}")
        return spatial
    if shape.spatial is None or len(tuple(shape.spatial)) != rank:
        raise SpecError(f"{label}: the model leaves the map's size open ({declared}): pass spatial= with {rank} sizes")
    return tuple(shape.spatial)


def _dense(label: str, shape: Shape, features: int, units: int, has_bias: bool,
           known: tuple[int, tuple[int, ...]] | None) -> tuple[ConvSpec, bool]:
    """A dense geometry reading ``features`` (a flattened channels-first map); rank0 when no spatial."""
    channels = shape.channels if shape.channels is not None else (known[0] if known else features)
    spatial = tuple(shape.spatial_or(known[1] if known and shape.channels in (None, known[0]) else ()))
    if channels * math.prod(spatial) != features:
        raise SpecError(f"{label}: channels={channels} × spatial={spatial} is {channels * math.prod(spatial)} "
                        f"features, but the layer reads {features}")
    return dense_geometry(channels, spatial, units, has_bias), not spatial


# -- ONNX ------------------------------------------------------------------------------------
class OnnxSide(Side):
    """One linear node of an ONNX model, run alone by ONNX Runtime with the probe weights as graph inputs."""

    framework = "onnxruntime"

    def __init__(self, model: Any, shape: Shape, *, node: str | None = None) -> None:
        import onnx

        model, where = _load_onnx(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is a help, not a must: a >2 GB model or an op it does not know
            inferred = model
        graph = inferred.graph
        consts = _constants(graph)
        picked = _pick_node(graph, consts, node, where)
        op, name = picked.op_type, picked.name or picked.output[0]
        label = f"onnx {op} {name!r}"
        nodes = [picked]
        w_name = picked.input[1]
        w = consts[w_name]
        if w.ndim < 2:
            raise SpecError(f"{label}: its weight {w_name!r} has shape={w.shape}: expected at least 2 axes")
        b_name = picked.input[2] if len(picked.input) > 2 and picked.input[2] else None
        if op == "MatMul":
            add = [n for n in graph.node if n.op_type == "Add" and picked.output[0] in n.input]
            other = [i for i in (add[0].input if len(add) == 1 else ()) if i != picked.output[0]]
            if other and other[0] in consts and consts[other[0]].size == w.shape[-1]:
                nodes.append(add[0])
                b_name = other[0]
        dtype = _ONNX_DTYPES.get(int(_elem_type(graph, w_name, consts)), "")
        if not dtype:
            raise SpecError(f"{label}: its weight {w_name!r} is of type {w.dtype}: expected float32 or float64")
        bias = consts.get(b_name) if b_name else None
        if b_name and bias is None:
            raise SpecError(f"{label}: its bias {b_name!r} is computed in the graph: expected a constant")
        group = int(_attr(picked, "group", 1))
        units = {"Gemm": w.shape[0] if _attr(picked, "transB", 0) else w.shape[-1], "MatMul": w.shape[-1],
                 "Conv": w.shape[0], "ConvTranspose": w.shape[1] * group}[op]
        has_bias = bias is not None and bias.size == units  # else a fixed offset, kept as a constant
        self._bias_shape = tuple(bias.shape) if has_bias else ()
        dims = _dims(graph, picked.input[0])
        if op in ("Gemm", "MatMul"):
            if op == "Gemm" and _attr(picked, "transA", 0):
                raise SpecError(f"{label}: transA=1 reads the batch as its second axis: expected transA=0")
            if (dims is not None and len(dims) != 2) or w.ndim != 2:
                raise SpecError(f"{label} reads an input of rank {len(dims or ())} with a weight of rank {w.ndim}: "
                                "expected (batch, features) times a 2-D weight")
            features, units = (w.shape[1], w.shape[0]) if op == "Gemm" and _attr(picked, "transB", 0) else w.shape
            if dims is not None and dims[1] not in (None, features):
                raise SpecError(f"{label} reads {dims[1]} features but its weight {w_name!r} of shape={w.shape} "
                                f"takes {features}")
            geometry, rank0 = _dense(label, shape, features, units, has_bias, _flatten_source(graph, picked.input[0]))
            kind, flat, x_dims = "dense", True, (features,)
        else:
            geometry = _onnx_conv(label, picked, w, dims, shape, has_bias)
            kind, flat, rank0, x_dims = "conv", False, False, (geometry.in_channels, *geometry.spatial)
        self._model = _node_model(model, nodes, picked.input[0], w_name, b_name if has_bias else None, consts,
                                  dtype, x_dims, w.shape, self._bias_shape)
        self._session: Any = None
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=w.shape, has_bias=has_bias,
                         data_format=CHANNELS_FIRST, dtype=dtype, flat_input=flat, rank0=rank0)
        self.session()  # a graph ONNX Runtime refuses is bad input, said now

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            from equivcheck.backends.onnxruntime import PROVIDER, session_options

            try:
                self._session = ort.InferenceSession(self._model, session_options(ort), providers=[PROVIDER])
            except Exception as exc:
                raise SpecError(f"{self.label}: onnxruntime cannot run it: {framework_message(exc)}") from None
        return self._session

    def release(self) -> None:
        super().release()
        self._session = None

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        feeds = {"x": x, "W": kernel}
        if self.has_bias:
            b = bias if bias is not None else np.zeros(self.geometry.out_channels, self.np_dtype)
            feeds["B"] = b.reshape(self._bias_shape)
        return self.session().run(None, feeds)[0]


def _load_onnx(obj: Any) -> tuple[Any, str]:
    import onnx

    if isinstance(obj, onnx.ModelProto):
        return obj, "the model"
    if not isinstance(obj, str):  # an InferenceSession: the model it was made from
        path, data = getattr(obj, "_model_path", None), getattr(obj, "_model_bytes", None)
        if path is None and data is None:
            raise SpecError("onnxruntime.InferenceSession keeps no model to read: pass the ModelProto or the .onnx path")
        obj = path if path is not None else data
    where = f"model={obj!r}" if isinstance(obj, str) else "the session's model"
    if isinstance(obj, str) and not os.path.isfile(obj):
        raise SpecError(f"model file={obj!r} not found: expected an .onnx file (or MODULE:ATTR with --source)")
    try:
        model = onnx.load(obj) if isinstance(obj, str) else onnx.load_model_from_string(obj)
    except Exception as exc:
        raise SpecError(f"{where} is not an ONNX model: {framework_message(exc)}") from None
    return model, where


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    try:
        for t in graph.initializer:
            out[t.name] = numpy_helper.to_array(t)
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    except Exception as exc:
        raise SpecError(f"the ONNX model's constants cannot be read: {framework_message(exc)}") from None
    return out


def _elem_type(graph: Any, name: str, consts: dict[str, np.ndarray]) -> int:
    for t in graph.initializer:
        if t.name == name:
            return int(t.data_type)
    return {"float32": 1, "float64": 11}.get(consts[name].dtype.name, 0)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _linear_nodes(graph: Any, consts: dict[str, np.ndarray]) -> list[Any]:
    return [n for n in graph.node if n.op_type in ONNX_LINEAR and n.domain in ("", "ai.onnx")
            and len(n.input) > 1 and n.input[1] in consts]


def _pick_node(graph: Any, consts: dict[str, np.ndarray], node: str | None, where: str) -> Any:
    linear = _linear_nodes(graph, consts)
    names = [n.name or n.output[0] for n in linear]
    if node is None:
        if len(linear) == 1:
            return linear[0]
        if not linear:
            ops = sorted({n.op_type for n in graph.node})
            raise SpecError(f"{where} has no linear node with a constant weight ({'/'.join(ONNX_LINEAR)}); "
                            f"its ops: {', '.join(ops) or 'none'}")
        raise SpecError(f"{where} has {len(linear)} linear nodes: pick one with MODEL:NODE or (model, NODE), "
                        f"one of {', '.join(names)}")
    found = [n for n in graph.node if node in (n.name, *n.output[:1])]
    if not found:
        every = [n.name or n.output[0] for n in graph.node]
        shown = ", ".join(every[:30]) + (f" … ({len(every)} in all)" if len(every) > 30 else "")
        raise SpecError(f"node={node!r} not found in {where}: its nodes are {shown or 'none'}")
    if found[0] not in linear:
        raise SpecError(f"node={node!r} is {found[0].op_type}: expected a {'/'.join(ONNX_LINEAR)} node with a "
                        f"constant weight (here: {', '.join(names) or 'none'})")
    return found[0]


def _dims(graph: Any, name: str) -> tuple[int | None, ...] | None:
    """The declared (or inferred) shape of tensor ``name``; None for a dynamic size, or no shape at all."""
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in vi.type.tensor_type.shape.dim)
    return None


def _flatten_source(graph: Any, name: str) -> tuple[int, tuple[int, ...]] | None:
    """(channels, spatial) of the map a Flatten/Reshape turned into ``name``, when its shape is known."""
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None or producer.op_type not in ("Flatten", "Reshape"):
        return None
    if producer.op_type == "Flatten" and _attr(producer, "axis", 1) != 1:
        return None
    dims = _dims(graph, producer.input[0])
    if not dims or len(dims) < 3 or any(d is None for d in dims[1:]):
        return None
    return int(dims[1]), tuple(int(d) for d in dims[2:])  # type: ignore[arg-type]


def _onnx_conv(label: str, node: Any, w: np.ndarray, dims: tuple[int | None, ...] | None, shape: Shape,
               has_bias: bool) -> ConvSpec:
    rank = w.ndim - 2
    if not 1 <= rank <= 3:
        raise SpecError(f"{label}: its weight has shape={w.shape}: expected a 1-D to 3-D convolution kernel")
    transposed = node.op_type == "ConvTranspose"
    group = int(_attr(node, "group", 1))
    ks = tuple(int(k) for k in _attr(node, "kernel_shape", w.shape[2:]))
    cin, cout = (w.shape[0], w.shape[1] * group) if transposed else (w.shape[1] * group, w.shape[0])
    if shape.channels is not None and shape.channels != cin:
        raise SpecError(f"{label}: channels={shape.channels} but the node reads {cin} channels")
    if dims is not None and len(dims) != rank + 2:
        raise SpecError(f"{label} reads an input of rank {len(dims)}: expected {rank + 2} for its {rank}-D kernel")
    spatial = _map_keywords(label, shape, tuple(dims[2:]) if dims else (None,) * rank, rank)
    stride = tuple(_attr(node, "strides", [1] * rank))
    dilation = tuple(_attr(node, "dilations", [1] * rank))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:
        pads = []
        for n, k, s, d in zip(spatial, ks, stride, dilation):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        padding: Any = tuple(pads)
    elif auto_pad in ("NOTSET", "VALID"):
        flat = list(_attr(node, "pads", [0] * (2 * rank))) if auto_pad == "NOTSET" else [0] * (2 * rank)
        padding = tuple(zip(flat[:rank], flat[rank:]))
    else:
        raise SpecError(f"{label}: auto_pad={auto_pad!r} is not supported here: give explicit pads")
    out_pad: Any = 0
    if transposed:
        if _attr(node, "output_shape", None) is not None:
            raise SpecError(f"{label}: output_shape= is not supported: expected explicit pads and output_padding")
        if any(lo != hi for lo, hi in padding):
            raise SpecError(f"{label}: pads={padding} are uneven: a transposed conv is supported with equal pads per axis")
        padding = tuple(lo for lo, _ in padding)
        out_pad = tuple(_attr(node, "output_padding", [0] * rank))
    return ConvSpec(cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding, groups=group,
                    transposed=transposed, output_padding=out_pad, bias=has_bias)


def _node_model(model: Any, nodes: list[Any], x: str, w: str, b: str | None, consts: dict[str, np.ndarray],
                dtype: str, x_dims: tuple[int, ...], w_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bytes:
    """The serialised model of ``nodes`` alone: inputs ``x``, ``W`` (and ``B``); other constants kept."""
    import onnx
    from onnx import helper, numpy_helper

    rename = {x: "x", w: "W", nodes[-1].output[0]: "y"} | ({b: "B"} if b else {})
    inner = {n.output[0] for n in nodes}
    copies, kept = [], []
    for original in nodes:
        n = onnx.NodeProto()
        n.CopyFrom(original)
        del n.output[1:]  # optional outputs nobody here reads
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
            elif name and name not in inner:
                if name not in consts:
                    raise SpecError(f"node {original.name or original.output[0]!r} reads {name!r}, computed in the "
                                    "graph: expected constants besides its data input")
                kept.append(numpy_helper.from_array(consts[name], name))
        n.output[0] = rename.get(n.output[0], n.output[0])
        copies.append(n)
    elem = {"float32": 1, "float64": 11}[dtype]
    inputs = [helper.make_tensor_value_info("x", elem, ["N", *x_dims]),
              helper.make_tensor_value_info("W", elem, list(w_shape))]
    if b:
        inputs.append(helper.make_tensor_value_info("B", elem, list(b_shape)))
    graph = helper.make_graph(copies, "equivcheck_explore", inputs, [helper.make_tensor_value_info("y", elem, None)],
                              initializer=kept)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="equivcheck")
    out.ir_version = model.ir_version
    return out.SerializeToString()


# -- TFLite ----------------------------------------------------------------------------------
TFLITE_LINEAR = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")
_FLOAT32 = 0  # TensorType.FLOAT32


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from equivcheck.backends._tensorflow import import_tensorflow

        import_tensorflow()
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


class TfliteSide(Side):
    """A TFLite model with one linear op, run whole; each probe kernel is patched into its constant buffer."""

    framework = "tflite"

    def __init__(self, model: bytes, shape: Shape, *, label: str = "tflite model") -> None:
        from equivcheck.backends.tflite import interpreter_class

        if len(model) < 8 or model[4:8] != b"TFL3":
            raise SpecError(f"{label} is not a TFLite flatbuffer (no 'TFL3' identifier): expected a .tflite model")
        self._interpreter = interpreter_class()
        try:
            self._interpreter(model_content=model, num_threads=1)  # the interpreter verifies the flatbuffer
        except Exception as exc:
            raise SpecError(f"{label} does not load in the TFLite interpreter: {framework_message(exc)}") from None
        try:
            parsed = _parse_tflite(model, _schema(), label, shape)
        except EquivcheckError:
            raise
        except Exception as exc:  # a flatbuffer the interpreter took but the schema reader cannot follow
            raise SpecError(f"{label}: its flatbuffer cannot be read: {framework_message(exc)}") from None
        op, geometry, kernel_shape, self._places, fmt, flat, rank0, self._out, activation = parsed
        self._model = model
        label = f"{label} {op}" + (f" (fused {activation})" if activation != "NONE" else "")
        super().__init__(label=label, kind="dense" if op == "FULLY_CONNECTED" else "conv", geometry=geometry,
                         kernel_shape=kernel_shape, has_bias="bias" in self._places, data_format=fmt,
                         dtype="float32", flat_input=flat, rank0=rank0)

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        data = bytearray(self._model)
        for name, (start, length) in self._places.items():
            values = kernel if name == "kernel" else (bias if bias is not None else np.zeros(length // 4, np.float32))
            data[start:start + length] = np.ascontiguousarray(values, dtype="<f4").tobytes()
        model = bytes(data)
        try:
            return self._run(model, x)
        except Exception:
            if len(x) == 1:
                raise
        return self._run(model, x, one_at_a_time=True)  # a model whose shapes are fixed to one sample

    def _run(self, model: bytes, x: np.ndarray, *, one_at_a_time: bool = False) -> np.ndarray:
        it = self._interpreter(model_content=model, num_threads=1)
        detail = it.get_input_details()[0]
        chunk = x[:1] if one_at_a_time else x
        if tuple(detail["shape"]) != chunk.shape:
            it.resize_tensor_input(detail["index"], list(chunk.shape), strict=False)
        it.allocate_tensors()
        out_index = it.get_output_details()[0]["index"]
        ys = []
        for i in range(0, len(x), len(chunk)):
            it.set_tensor(detail["index"], np.ascontiguousarray(x[i:i + len(chunk)]))
            it.invoke()
            y = np.array(it.get_tensor(out_index))
            if y.size != len(chunk) * math.prod(self._out):
                raise SpecError(f"{self.label} returned shape={y.shape} for a batch of {len(chunk)}")
            ys.append(y.reshape(len(chunk), *self._out))
        return np.concatenate(ys)


def _tensor_shape(t: Any) -> tuple[int, ...]:
    """A tensor's shape, -1 where its signature leaves a size open."""
    sig = [int(t.ShapeSignature(j)) for j in range(t.ShapeSignatureLength())]
    shape = [int(t.Shape(j)) for j in range(t.ShapeLength())]
    return tuple(sig) if len(sig) == len(shape) else tuple(shape)


def _buffer_place(model: Any, sg: Any, index: int, what: str, label: str) -> tuple[int, int]:
    """(byte offset, length) of constant float32 tensor ``index``'s data in the flatbuffer."""
    t = sg.Tensors(index)
    if t.Type() != _FLOAT32:
        raise SpecError(f"{label}: its {what} is of TensorType {t.Type()} (quantized?): expected float32")
    buffer = t.Buffer()
    users = sum(1 for s in range(model.SubgraphsLength()) for j in range(model.Subgraphs(s).TensorsLength())
                if model.Subgraphs(s).Tensors(j).Buffer() == buffer)
    b = model.Buffers(buffer)
    o = b._tab.Offset(4)  # Buffer.data
    start, length = (b._tab.Vector(o), b._tab.VectorLen(o)) if o else (int(getattr(b, "Offset", lambda: 0)()),
                                                                       int(getattr(b, "Size", lambda: 0)()))
    size = 4 * math.prod(max(d, 0) for d in _tensor_shape(t))
    if not length or (o == 0 and start <= 1):
        raise SpecError(f"{label}: its {what} is not a constant (computed in the model, e.g. dequantized): "
                        "expected float32 weights stored in the model")
    if length != size or users != 1:
        raise SpecError(f"{label}: its {what}'s buffer holds {length} bytes shared by {users} tensors: "
                        f"expected {size} bytes of its own")
    return start, length


def _parse_tflite(data: bytes, S: Any, label: str, shape: Shape) -> tuple:
    model = S.Model.GetRootAs(data, 0)
    if model.SubgraphsLength() != 1:
        raise SpecError(f"{label} has {model.SubgraphsLength()} subgraphs: expected 1")
    sg = model.Subgraphs(0)
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    ops = []
    for i in range(sg.OperatorsLength()):
        c = codes[sg.Operators(i).OpcodeIndex()]
        ops.append(names.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), "CUSTOM"))
    linear = [i for i, name in enumerate(ops) if name in TFLITE_LINEAR]
    if len(linear) != 1:
        raise SpecError(f"{label} has {len(linear)} linear ops ({', '.join(ops[i] for i in linear) or 'ops: ' + ', '.join(ops)}): "
                        f"expected exactly one of {', '.join(TFLITE_LINEAR)} (convert one layer alone)")
    if sg.InputsLength() != 1 or sg.OutputsLength() != 1:
        raise SpecError(f"{label} has {sg.InputsLength()} inputs and {sg.OutputsLength()} outputs: expected one each")
    x = sg.Tensors(sg.Inputs(0))
    if x.Type() != _FLOAT32:
        raise SpecError(f"{label}: its input is of TensorType {x.Type()} (quantized?): expected float32")
    dims = tuple(d if d > 0 else None for d in _tensor_shape(x)[1:])
    op = sg.Operators(linear[0])
    name = ops[linear[0]]
    inputs = [int(op.Inputs(j)) for j in range(op.InputsLength())]
    w_at, b_at, x_at = (1, 3, 2) if name == "TRANSPOSE_CONV" else (1, 2, 0)
    places = {"kernel": _buffer_place(model, sg, inputs[w_at], "kernel", label)}
    if len(inputs) > b_at and inputs[b_at] >= 0:
        places["bias"] = _buffer_place(model, sg, inputs[b_at], "bias", label)
    w = _tensor_shape(sg.Tensors(inputs[w_at]))
    options_class = {"FULLY_CONNECTED": "FullyConnectedOptions", "CONV_2D": "Conv2DOptions",
                     "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "TRANSPOSE_CONV": "TransposeConvOptions"}[name]
    table = op.BuiltinOptions()
    if table is None:
        raise SpecError(f"{label}: its {name} op carries no options")
    opts = getattr(S, options_class)()
    opts.Init(table.Bytes, table.Pos)
    acts = {v: k for k, v in vars(S.ActivationFunctionType).items() if not k.startswith("_")}
    activation = acts.get(getattr(opts, "FusedActivationFunction", lambda: 0)(), "?")
    has_bias = "bias" in places
    if name == "FULLY_CONNECTED":
        units, features = w
        if opts.WeightsFormat() != 0:
            raise SpecError(f"{label}: FULLY_CONNECTED weights_format={opts.WeightsFormat()}: expected DEFAULT (0)")
        if len(dims) == 1:
            geometry, rank0 = _dense(label, shape, features, units, has_bias, None)
            return name, geometry, w, places, CHANNELS_LAST, True, rank0, (units,), activation
        if None in dims or dims[-1] * math.prod(dims[:-1]) != features:  # type: ignore[operator]
            raise SpecError(f"{label} reads a map of shape {dims} into FULLY_CONNECTED of {features} features: "
                            "expected a fixed map whose sizes multiply to that")
        channels, spatial = int(dims[-1]), tuple(int(d) for d in dims[:-1])  # type: ignore[arg-type]
        if (shape.channels not in (None, channels)) or (shape.spatial is not None and tuple(shape.spatial) != spatial):
            raise SpecError(f"{label} reads a map of {spatial} × {channels} channels (NHWC): channels={shape.channels}, "
                            f"spatial={shape.spatial} do not match it")
        return (name, dense_geometry(channels, spatial, units, has_bias), w, places, CHANNELS_LAST, False, False,
                (units,), activation)
    geometry, out = _tflite_conv(label, name, sg, op, inputs[x_at], w, dims, opts, shape, has_bias)
    return name, geometry, w, places, CHANNELS_LAST, False, False, out, activation


def _tflite_conv(label: str, name: str, sg: Any, op: Any, x_index: int, w: tuple[int, ...],
                 dims: tuple[int | None, ...], opts: Any, shape: Shape, has_bias: bool) -> tuple[ConvSpec, tuple]:
    op_in = _tensor_shape(sg.Tensors(x_index))[1:]  # (H, W, C)
    lift = len(dims) == 2 and len(op_in) == 3 and op_in[0] == 1 and w[1] == 1  # a 1-D conv run as a 1×W image
    if len(dims) != 3 and not lift:
        raise SpecError(f"{label} reads a map of shape {dims}: expected (H, W, C) for its {name}")
    channels = op_in[-1]
    if dims[-1] not in (None, channels) or (None not in dims and tuple(dims[:-1]) != tuple(op_in[1 if lift else 0:-1])):
        raise SpecError(f"{label}: its input {dims} is not the {name}'s input {op_in}: ops before it change the map "
                        "(convert the layer alone)")
    if shape.channels is not None and shape.channels != channels:
        raise SpecError(f"{label}: channels={shape.channels} but the {name} reads {channels} channels")
    keep = slice(1, 3) if lift else slice(0, 2)
    rank = 1 if lift else 2
    spatial = _map_keywords(label, shape, tuple(dims[:-1]), rank)
    ks = (w[1], w[2])[keep]
    stride = (opts.StrideH(), opts.StrideW())[keep]
    dilation = (getattr(opts, "DilationHFactor", lambda: 1)(), getattr(opts, "DilationWFactor", lambda: 1)())[keep]
    same = opts.Padding() == 0  # Padding.SAME
    if name == "CONV_2D":
        if channels % w[3]:
            raise SpecError(f"{label}: CONV_2D filter {w} does not divide the {channels} input channels")
        geometry = ConvSpec(channels, w[0], ks, spatial=spatial, stride=stride, dilation=dilation,
                            padding="same" if same else "valid", groups=channels // w[3], bias=has_bias)
    elif name == "DEPTHWISE_CONV_2D":
        geometry = ConvSpec(channels, w[3], ks, spatial=spatial, stride=stride, dilation=dilation,
                            padding="same" if same else "valid", groups=channels, bias=has_bias)
    else:
        out_spatial = _tensor_shape(sg.Tensors(int(op.Outputs(0))))[1:-1][keep]
        pads, extra = [], []
        for n, k, s, o in zip(spatial, ks, stride, out_spatial):
            total = (n - 1) * s + k - o  # cropped from the full output; negative: output padding added
            pad, op_pad = (total // 2, 0) if same and total > 0 else (0, -total)
            if (same and total > 0 and total % 2) or not 0 <= op_pad < s:
                raise SpecError(f"{label}: TRANSPOSE_CONV from {n} to {o} with kernel {k}, stride {s} crops unevenly: "
                                "not supported")
            pads.append(pad)
            extra.append(op_pad)
        geometry = ConvSpec(w[3], w[0], ks, spatial=spatial, stride=stride, padding=tuple(pads), transposed=True,
                            output_padding=tuple(extra), bias=has_bias)
    return geometry, (*geometry.output_spatial, geometry.out_channels)

"""Sides made of exported models: one linear node of an ONNX graph, one linear op of a TFLite model.

* :class:`OnnxSide` — an ``onnx.ModelProto``, a ``.onnx`` path or an ``onnxruntime.InferenceSession``
  holding one linear node (``Gemm``, ``MatMul`` with a constant weight and its bias ``Add``,
  ``Conv``, ``ConvTranspose``), or a node picked from a larger graph: ``(model, "NODE")`` or
  ``"model.onnx:NODE"``, ``NODE`` being the node's name or its output's. The node, with its own
  attributes, becomes a model of its own whose weight and bias are graph inputs: one ONNX Runtime
  session (CPU EP) takes ``x``, the probe kernel and bias. Its map is the node's input; a dense
  node fed by a ``Flatten`` of a known map reads that map (channels first).
* :class:`TfliteSide` — a TFLite flatbuffer (``bytes`` or a ``.tflite`` path) with one
  ``FULLY_CONNECTED``, ``CONV_2D``, ``DEPTHWISE_CONV_2D`` or ``TRANSPOSE_CONV`` op. The whole
  model runs on the tflite backend's interpreter; each probe kernel is written into the weight's
  constant buffer in a copy of the flatbuffer, which a new interpreter then runs.

Geometry comes from the node's attributes and the shapes the model declares (ONNX: after shape
inference); the shape keywords fill in what is dynamic. Frameworks are imported only when such a
model is given.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, ProbeError, SpecError, framework_message
from equivcheck.explore.sides import Side, dense_geometry
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, ConvSpec, Shape

__all__ = ["OnnxSide", "TfliteSide", "runtime_side", "split_model_path"]

ONNX_LINEAR = ("Gemm", "MatMul", "Conv", "ConvTranspose")
TFLITE_LINEAR = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")
SUFFIXES = (".onnx", ".tflite")
_ONNX_DTYPES = {1: "float32", 11: "float64"}  # TensorProto FLOAT, DOUBLE
_TFL_FLOAT32 = 0  # TensorType.FLOAT32


def split_model_path(text: str) -> tuple[str, str | None] | None:
    """``"m.onnx"`` → (path, None), ``"m.onnx:NODE"`` → (path, NODE); None when ``text`` names no model file."""
    if text.lower().endswith(SUFFIXES):
        return text, None
    head, sep, node = text.rpartition(":")
    return (head, node) if sep and node and head.lower().endswith(SUFFIXES) else None


def runtime_side(obj: Any, shape: Shape) -> Side | None:
    """A side for an ONNX or TFLite model (path, bytes, object, or ``(model, NODE)``); None for anything else."""
    node = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], str) and _is_onnx(obj[0], paths=True):
        obj, node = obj
        if not node:
            raise SpecError("NODE='' is empty: expected the name of a node (or of its output) in the graph")
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str):
        split = split_model_path(obj)
        if split is None:
            return None
        path, named = split
        if node is not None and named is not None:
            raise SpecError(f"model={obj!r} names node {named!r} and NODE={node!r} is given too: give one")
        if path.lower().endswith(".tflite"):
            if (named or node) is not None:
                raise SpecError(f"model={obj!r}: a TFLite model is explored whole (one linear op), not by NODE")
            return TfliteSide(_read(path), shape, label=f"tflite {os.path.basename(path)}")
        return OnnxSide(path, shape, node=node or named)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return TfliteSide(bytes(obj), shape)
    return OnnxSide(obj, shape, node=node) if _is_onnx(obj) else None


def _is_onnx(obj: Any, paths: bool = False) -> bool:
    onnx, ort = sys.modules.get("onnx"), sys.modules.get("onnxruntime")
    return ((paths and isinstance(obj, (str, os.PathLike))) or (onnx is not None and isinstance(obj, onnx.ModelProto))
            or (ort is not None and isinstance(obj, ort.InferenceSession)))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SpecError(f"model file={path!r} cannot be read: {exc.strerror or type(exc).__name__}") from None


def _spatial(label: str, shape: Shape, declared: tuple[int | None, ...]) -> tuple[int, ...]:
    """The map's spatial size: as declared, else ``spatial=``; a given ``spatial`` must agree with a declared one."""
    if all(d is not None for d in declared):
        spatial = tuple(int(d) for d in declared)
        if shape.spatial is not None and tuple(shape.spatial) != spatial:
            raise SpecError(f"{label}: spatial={tuple(shape.spatial)} but the model declares a map of {spatial}")
        return spatial
    if shape.spatial is None or len(tuple(shape.spatial)) != len(declared):
        raise SpecError(f"{label}: the model leaves the map's size open ({declared}): pass spatial= with "
                        f"{len(declared)} sizes")
    return tuple(shape.spatial)


def _dense(label: str, shape: Shape, features: int, units: int, has_bias: bool,
           known: tuple[int, tuple[int, ...]] | None = None) -> tuple[ConvSpec, bool]:
    """A dense geometry reading ``features`` (a flattened map, ``known`` when the model says which); rank0 when plain."""
    channels = shape.channels if shape.channels is not None else (known[0] if known else features)
    spatial = tuple(shape.spatial_or(known[1] if known and shape.channels in (None, known[0]) else ()))
    if channels * math.prod(spatial) != features:
        raise SpecError(f"{label}: channels={channels} × spatial={spatial} is {channels * math.prod(spatial)} "
                        f"features, but the layer reads {features}")
    return dense_geometry(channels, spatial, units, has_bias), not spatial


def _conv(label: str, *args: Any, **kwargs: Any) -> ConvSpec:
    try:
        return ConvSpec(*args, **kwargs)
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None


# -- ONNX ------------------------------------------------------------------------------------
class OnnxSide(Side):
    """One linear node of an ONNX model, run alone by ONNX Runtime with the probe weights as graph inputs."""

    framework = "onnxruntime"

    def __init__(self, model: Any, shape: Shape, *, node: str | None = None) -> None:
        import onnx

        model, where = _load_onnx(model)
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # a help, not a must (a model over 2 GB, an op it does not know)
            graph = model.graph
        consts = {t.name: t for t in graph.initializer} | {
            n.output[0]: n.attribute[0].t for n in graph.node
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
        picked = _pick_node(graph, consts, node, where)
        op = picked.op_type
        label = f"onnx {op} {picked.name or picked.output[0]!r}"
        w_name, nodes = picked.input[1], [picked]
        ws, dt = tuple(int(d) for d in consts[w_name].dims), consts[w_name].data_type  # its shape, without reading it
        dtype = _ONNX_DTYPES.get(dt, "")
        if not dtype or len(ws) < 2:
            raise SpecError(f"{label}: its weight {w_name!r} has data_type={dt}, shape={ws}: expected 1 (float32) or "
                            "11 (float64) with at least 2 axes")
        b_name = picked.input[2] if len(picked.input) > 2 and picked.input[2] else None
        if op == "MatMul":  # its bias is the Add after it, when that adds a constant
            adds = [n for n in graph.node if picked.output[0] in n.input]
            other = [i for i in adds[0].input if i != picked.output[0]] if len(adds) == 1 and adds[0].op_type == "Add" else []
            if len(other) == 1 and other[0] in consts:
                nodes.append(adds[0])
                b_name = other[0]
        if b_name and b_name not in consts:
            raise SpecError(f"{label}: its bias {b_name!r} is computed in the graph: expected a constant")
        trans_b = op == "Gemm" and _attr(picked, "transB", 0)
        units = {"Gemm": ws[0] if trans_b else ws[-1], "MatMul": ws[-1], "Conv": ws[0],
                 "ConvTranspose": ws[1] * int(_attr(picked, "group", 1))}[op]
        bias_dims = tuple(consts[b_name].dims) if b_name else ()
        has_bias = b_name is not None and math.prod(bias_dims) == units  # else a fixed offset, kept as a constant
        self._bias_shape = bias_dims
        dims = _dims(graph, picked.input[0])
        if op in ("Gemm", "MatMul"):
            features = ws[1] if trans_b else ws[0]
            if op == "Gemm" and _attr(picked, "transA", 0):
                raise SpecError(f"{label}: transA=1 reads the batch as its second axis: expected transA=0")
            if (dims is not None and len(dims) != 2) or len(ws) != 2:
                raise SpecError(f"{label} reads an input of rank {len(dims or ())} with a weight of rank {len(ws)}: "
                                "expected (batch, features) times a 2-D weight")
            if dims is not None and dims[1] not in (None, features):
                raise SpecError(f"{label} reads {dims[1]} features but its weight of shape={ws} takes {features}")
            geometry, rank0 = _dense(label, shape, features, units, has_bias, _flatten_source(graph, picked.input[0], features))
            kind, x_dims = "dense", (features,)
        else:
            geometry, rank0 = _onnx_conv(label, picked, ws, dims, shape, has_bias), False
            kind, x_dims = "conv", (geometry.in_channels, *geometry.spatial)
        self._names = [picked.input[0], w_name, *([b_name] if has_bias else [])]  # x, W (and B): the inputs
        self._model = _node_model(model, nodes, self._names, consts, dtype, [x_dims, ws, bias_dims])
        self._session: Any = None
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=ws, has_bias=has_bias,
                         data_format=CHANNELS_FIRST, dtype=dtype, flat_input=kind == "dense", rank0=rank0)
        self.session()  # a graph ONNX Runtime refuses is bad input: said now

    def session(self) -> Any:
        """The ONNX Runtime session on the node alone (its inputs: data, weight and bias)."""
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
        values = [x, kernel]
        if self.has_bias:
            values.append((bias if bias is not None else np.zeros(self.geometry.out_channels, self.np_dtype))
                          .reshape(self._bias_shape))
        return self.session().run(None, dict(zip(self._names, values)))[0]


def _load_onnx(obj: Any) -> tuple[Any, str]:
    import onnx

    if isinstance(obj, onnx.ModelProto):
        return obj, "the model"
    if not isinstance(obj, str):  # an InferenceSession: the model it was made from
        obj = getattr(obj, "_model_path", None) or getattr(obj, "_model_bytes", None)
        if obj is None:
            raise SpecError("the InferenceSession keeps no model to read: pass the ModelProto or the .onnx path")
    where = f"model={obj!r}" if isinstance(obj, str) else "the session's model"
    if isinstance(obj, str) and not os.path.isfile(obj):
        raise SpecError(f"model file={obj!r} not found: expected an .onnx file (or MODULE:ATTR with --source)")
    try:
        return (onnx.load(obj) if isinstance(obj, str) else onnx.load_model_from_string(obj)), where
    except Exception as exc:
        raise SpecError(f"{where} is not an ONNX model: {framework_message(exc)}") from None


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _pick_node(graph: Any, consts: dict[str, Any], node: str | None, where: str) -> Any:
    linear = [n for n in graph.node if n.op_type in ONNX_LINEAR and n.domain in ("", "ai.onnx")
              and len(n.input) > 1 and n.input[1] in consts]
    names = ", ".join(n.name or n.output[0] for n in linear)
    if node is None:
        if len(linear) == 1:
            return linear[0]
        if not linear:
            ops = ", ".join(sorted({n.op_type for n in graph.node})) or "none"
            raise SpecError(f"{where} has no linear node with a constant weight ({'/'.join(ONNX_LINEAR)}); its ops: {ops}")
        raise SpecError(f"{where} has {len(linear)} linear nodes: pick one with MODEL:NODE or (model, NODE), one of {names}")
    found = [n for n in graph.node if node in (n.name, *n.output[:1])]
    if not found:
        every = [n.name or n.output[0] for n in graph.node]
        shown = ", ".join(every[:30]) + (f" … ({len(every)} in all)" if len(every) > 30 else "")
        raise SpecError(f"node={node!r} not found in {where}: its nodes are {shown or 'none'}")
    if found[0] not in linear:
        raise SpecError(f"node={node!r} is {found[0].op_type}: expected a {'/'.join(ONNX_LINEAR)} node with a "
                        f"constant weight (here: {names or 'none'})")
    return found[0]


def _dims(graph: Any, name: str) -> tuple[int | None, ...] | None:
    """The declared (or inferred) shape of tensor ``name``, None for a dynamic size; None when it has none."""
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in vi.type.tensor_type.shape.dim)
    return None


def _flatten_source(graph: Any, name: str, features: int) -> tuple[int, tuple[int, ...]] | None:
    """(channels, spatial) of the known map a Flatten (axis 1) or Reshape turned into ``name``'s ``features``."""
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None or producer.op_type not in ("Flatten", "Reshape") or _attr(producer, "axis", 1) != 1:
        return None
    dims = _dims(graph, producer.input[0])
    if not dims or len(dims) < 3 or None in dims[1:] or math.prod(dims[1:]) != features:
        return None
    return int(dims[1]), tuple(int(d) for d in dims[2:])


def _onnx_conv(label: str, node: Any, ws: tuple[int, ...], dims: tuple[int | None, ...] | None, shape: Shape,
               has_bias: bool) -> ConvSpec:
    rank, transposed, group = len(ws) - 2, node.op_type == "ConvTranspose", int(_attr(node, "group", 1))
    if not 1 <= rank <= 3 or (dims is not None and len(dims) != rank + 2):
        raise SpecError(f"{label}: its weight of shape={ws} reads an input of rank {len(dims or ())}: expected a "
                        "1-D to 3-D kernel on a (batch, channels, *spatial) input of 2 more axes")
    ks = tuple(int(k) for k in _attr(node, "kernel_shape", ws[2:]))
    cin, cout = (ws[0], ws[1] * group) if transposed else (ws[1] * group, ws[0])
    if shape.channels is not None and shape.channels != cin:
        raise SpecError(f"{label}: channels={shape.channels} but the node reads {cin} channels")
    spatial = _spatial(label, shape, tuple(dims[2:]) if dims else (None,) * rank)
    stride, dilation = tuple(_attr(node, "strides", [1] * rank)), tuple(_attr(node, "dilations", [1] * rank))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:  # TensorFlow's "same" puts the odd pad after
        pads = _conv(label, cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding="same").pads()
        padding: Any = pads if auto_pad == "SAME_UPPER" else tuple((hi, lo) for lo, hi in pads)
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
        padding, out_pad = tuple(lo for lo, _ in padding), tuple(_attr(node, "output_padding", [0] * rank))
    return _conv(label, cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
                 groups=group, transposed=transposed, output_padding=out_pad, bias=has_bias)


def _node_model(model: Any, nodes: list[Any], io: list[str], consts: dict[str, Any], dtype: str,
                shapes: list[tuple[int, ...]]) -> bytes:
    """The serialised model of ``nodes`` alone; its inputs the data, weight (and bias) names in ``io``."""
    import onnx
    from onnx import helper

    elem = {"float32": 1, "float64": 11}[dtype]
    inner = {n.output[0] for n in nodes}
    kept = []  # constants that are not the weights (a fixed offset): kept as they are
    for name in {i for n in nodes for i in n.input if i and i not in inner and i not in io}:
        if name not in consts:
            raise SpecError(f"node {nodes[0].name or nodes[0].output[0]!r} reads {name!r}, computed in the graph: "
                            "expected constants besides its data input")
        kept.append(onnx.TensorProto())
        kept[-1].CopyFrom(consts[name])
        kept[-1].name = name
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, n in zip(copies, nodes):
        copy.CopyFrom(n)
        del copy.output[1:]  # optional outputs nobody here reads
    inputs = [helper.make_tensor_value_info(name, elem, ["N", *dims] if i == 0 else list(dims))
              for i, (name, dims) in enumerate(zip(io, shapes))]
    graph = helper.make_graph(copies, "equivcheck_explore", inputs,
                              [helper.make_tensor_value_info(nodes[-1].output[0], elem, None)], initializer=kept)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="equivcheck")
    out.ir_version = model.ir_version
    return out.SerializeToString()


# -- TFLite ----------------------------------------------------------------------------------
class TfliteSide(Side):
    """A TFLite model with one linear op, run whole; each probe kernel is patched into its constant buffer."""

    framework = "tflite"

    def __init__(self, model: bytes, shape: Shape, *, label: str = "tflite model") -> None:
        from equivcheck.backends.tflite import interpreter_class

        if len(model) < 8 or model[4:8] != b"TFL3":
            raise SpecError(f"{label} is not a TFLite flatbuffer (no 'TFL3' identifier): expected a .tflite model")
        self._interpreter, self._model = interpreter_class(), model
        try:
            self._interpreter(model_content=model, num_threads=1)  # it verifies the flatbuffer
        except Exception as exc:
            raise SpecError(f"{label} does not load in the TFLite interpreter: {framework_message(exc)}") from None
        try:
            name, geometry, w, dims, activation = self._parse(_schema(), label, shape)
        except EquivcheckError:
            raise
        except Exception as exc:  # a flatbuffer the interpreter took but the schema reader cannot follow
            raise SpecError(f"{label}: its flatbuffer cannot be read: {framework_message(exc)}") from None
        dense = name == "FULLY_CONNECTED"
        self._out = (geometry.out_channels,) if dense else (*geometry.output_spatial, geometry.out_channels)
        label = f"{label} {name}" + (f" (fused {activation})" if activation != "NONE" else "")
        super().__init__(label=label, kind="dense" if dense else "conv", geometry=geometry, kernel_shape=w,
                         has_bias="bias" in self._places, data_format=CHANNELS_LAST, dtype="float32",
                         flat_input=dense and len(dims) == 1, rank0=dense and len(dims) == 1 and not shape.spatial)

    def _parse(self, S: Any, label: str, shape: Shape) -> tuple:
        model = S.Model.GetRootAs(self._model, 0)
        sg = model.Subgraphs(0)
        names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        ops = [names.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), "CUSTOM")
               for c in (codes[sg.Operators(i).OpcodeIndex()] for i in range(sg.OperatorsLength()))]
        linear = [i for i, name in enumerate(ops) if name in TFLITE_LINEAR]
        if len(linear) != 1 or model.SubgraphsLength() != 1:
            listed = ", ".join(ops[i] for i in linear) or "its ops: " + (", ".join(ops) or "none")
            raise SpecError(f"{label} has {len(linear)} linear ops ({listed}) in {model.SubgraphsLength()} subgraphs: "
                            f"expected exactly one of {', '.join(TFLITE_LINEAR)} (convert one layer alone)")
        x = sg.Tensors(sg.Inputs(0)) if sg.InputsLength() == 1 and sg.OutputsLength() == 1 else None
        if x is None or x.Type() != _TFL_FLOAT32:
            raise SpecError(f"{label}: expected one float32 input and one output (not quantized)")
        dims = tuple(d if d > 0 else None for d in _tfl_shape(x)[1:])
        op, name = sg.Operators(linear[0]), ops[linear[0]]
        inputs = [int(op.Inputs(j)) for j in range(op.InputsLength())]
        w_at, b_at, x_at = (1, 3, 2) if name == "TRANSPOSE_CONV" else (1, 2, 0)
        self._places = {"kernel": _buffer_place(model, sg, inputs[w_at], "kernel", label)}
        if len(inputs) > b_at and inputs[b_at] >= 0:
            self._places["bias"] = _buffer_place(model, sg, inputs[b_at], "bias", label)
        w, has_bias = _tfl_shape(sg.Tensors(inputs[w_at])), "bias" in self._places
        opts = getattr(S, {"FULLY_CONNECTED": "FullyConnectedOptions", "CONV_2D": "Conv2DOptions",
                           "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "TRANSPOSE_CONV": "TransposeConvOptions"}[name])()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        acts = {v: k for k, v in vars(S.ActivationFunctionType).items() if not k.startswith("_")}
        activation = acts.get(getattr(opts, "FusedActivationFunction", lambda: 0)(), "?")
        if name != "FULLY_CONNECTED":
            return name, _tflite_conv(label, name, sg, op, inputs[x_at], w, dims, opts, shape, has_bias), w, dims, activation
        if opts.WeightsFormat() != 0:
            raise SpecError(f"{label}: FULLY_CONNECTED weights_format={opts.WeightsFormat()}: expected DEFAULT (0)")
        if len(dims) > 1 and None in dims:
            raise SpecError(f"{label} reads a map of open shape {dims} into FULLY_CONNECTED: expected a fixed map")
        # plain features (flattened before the model: channels last, as TensorFlow does), or the model's own map
        known = (int(dims[-1]), tuple(int(d) for d in dims[:-1])) if len(dims) > 1 else None
        if known and (shape.channels not in (None, known[0]) or shape.spatial not in (None, known[1])):
            raise SpecError(f"{label} reads a map of {known[1]} × {known[0]} channels (NHWC): channels={shape.channels}, "
                            f"spatial={shape.spatial} do not match it")
        return name, _dense(label, shape, w[1], w[0], has_bias, known)[0], w, dims, activation

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        data = bytearray(self._model)
        for name, (start, length) in self._places.items():
            values = kernel if name == "kernel" else (bias if bias is not None else np.zeros(length // 4, np.float32))
            data[start:start + length] = np.ascontiguousarray(values, dtype="<f4").tobytes()
        model = bytes(data)
        try:
            return self._run(model, x, len(x))
        except Exception:
            if len(x) == 1:
                raise
        return self._run(model, x, 1)  # a model whose shapes are fixed to one sample

    def _run(self, model: bytes, x: np.ndarray, batch: int) -> np.ndarray:
        it = self._interpreter(model_content=model, num_threads=1)
        detail = it.get_input_details()[0]
        if tuple(detail["shape"]) != (batch, *x.shape[1:]):
            it.resize_tensor_input(detail["index"], [batch, *x.shape[1:]], strict=False)
        it.allocate_tensors()
        out_index, ys = it.get_output_details()[0]["index"], []
        for i in range(0, len(x), batch):
            it.set_tensor(detail["index"], np.ascontiguousarray(x[i:i + batch]))
            it.invoke()
            y = np.array(it.get_tensor(out_index))
            if y.size != batch * math.prod(self._out):
                raise ProbeError(f"{self.label} returned shape={y.shape} for a batch of {batch}")
            ys.append(y.reshape(batch, *self._out))
        return np.concatenate(ys)


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from equivcheck.backends._tensorflow import import_tensorflow

        import_tensorflow()
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _tfl_shape(t: Any) -> tuple[int, ...]:
    """A tensor's shape, -1 where its signature leaves a size open."""
    sig = [int(t.ShapeSignature(j)) for j in range(t.ShapeSignatureLength())]
    shape = [int(t.Shape(j)) for j in range(t.ShapeLength())]
    return tuple(sig) if len(sig) == len(shape) else tuple(shape)


def _buffer_place(model: Any, sg: Any, index: int, what: str, label: str) -> tuple[int, int]:
    """(byte offset, length) of the data of constant float32 tensor ``index`` in the flatbuffer."""
    t = sg.Tensors(index)
    if t.Type() != _TFL_FLOAT32:
        raise SpecError(f"{label}: its {what} is of TensorType {t.Type()} (quantized?): expected float32")
    buffer = t.Buffer()
    users = sum(model.Subgraphs(s).Tensors(j).Buffer() == buffer
                for s in range(model.SubgraphsLength()) for j in range(model.Subgraphs(s).TensorsLength()))
    b = model.Buffers(buffer)
    o = b._tab.Offset(4)  # Buffer.data; a model over 2 GB keeps it after the flatbuffer (offset, size)
    start, length = (b._tab.Vector(o), b._tab.VectorLen(o)) if o else (int(getattr(b, "Offset", int)()),
                                                                       int(getattr(b, "Size", int)()))
    size = 4 * math.prod(max(d, 0) for d in _tfl_shape(t))
    if not length or start <= 1:
        raise SpecError(f"{label}: its {what} is not a constant (computed in the model, e.g. dequantized): "
                        "expected float32 weights stored in the model")
    if length != size or users != 1:
        raise SpecError(f"{label}: its {what}'s buffer holds {length} bytes shared by {users} tensors: "
                        f"expected {size} bytes of its own")
    return start, length


def _tflite_conv(label: str, name: str, sg: Any, op: Any, x_index: int, w: tuple[int, ...],
                 dims: tuple[int | None, ...], opts: Any, shape: Shape, has_bias: bool) -> ConvSpec:
    op_in = _tfl_shape(sg.Tensors(x_index))[1:]  # (H, W, C)
    lift = len(dims) == 2 and len(op_in) == 3 and op_in[0] == 1 and w[1] == 1  # a 1-D conv run as a 1×W image
    channels, keep = op_in[-1], slice(1, 3) if lift else slice(0, 2)
    if (len(dims) != 3 and not lift) or dims[-1] not in (None, channels) or (
            None not in dims and tuple(dims[:-1]) != tuple(op_in[:-1])[keep]):
        raise SpecError(f"{label}: its input {dims} is not the {name}'s input {op_in}: ops before it change the map "
                        "(convert the layer alone)")
    if shape.channels not in (None, channels):
        raise SpecError(f"{label}: channels={shape.channels} but the {name} reads {channels} channels")
    spatial = _spatial(label, shape, tuple(dims[:-1]))
    ks, stride = (w[1], w[2])[keep], (opts.StrideH(), opts.StrideW())[keep]
    dilation = (getattr(opts, "DilationHFactor", lambda: 1)(), getattr(opts, "DilationWFactor", lambda: 1)())[keep]
    padding = "same" if opts.Padding() == 0 else "valid"  # Padding.SAME: TensorFlow's
    if name == "CONV_2D":
        groups = channels // w[3] if channels % w[3] == 0 else 0
        return _conv(label, channels, w[0], ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
                     groups=groups, bias=has_bias)
    if name == "DEPTHWISE_CONV_2D":
        return _conv(label, channels, w[3], ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
                     groups=channels, bias=has_bias)
    out_spatial = _tfl_shape(sg.Tensors(int(op.Outputs(0))))[1:-1][keep]
    pads, extra = [], []
    for n, k, s, o in zip(spatial, ks, stride, out_spatial):
        total = (n - 1) * s + k - o  # cropped from the full output; negative: output padding added
        pad, op_pad = (total // 2, 0) if padding == "same" and total > 0 else (0, -total)
        if 2 * pad != max(total, 0) or not 0 <= op_pad < s:
            raise SpecError(f"{label}: TRANSPOSE_CONV from {n} to {o} with kernel {k}, stride {s} crops unevenly or "
                            "pads more than a stride: not supported")
        pads.append(pad)
        extra.append(op_pad)
    return _conv(label, w[3], w[0], ks, spatial=spatial, stride=stride, padding=tuple(pads), transposed=True,
                 output_padding=tuple(extra), bias=has_bias)

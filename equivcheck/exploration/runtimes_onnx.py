"""One linear node of an ONNX graph as an explore side: :class:`OnnxSide` (see :mod:`equivcheck.exploration.runtimes`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equivcheck.backends.onnxruntime import node_attribute, read_onnx_model
from equivcheck.errors import SpecError, framework_message
from equivcheck.exploration.runtime_geometry import (
    ONNX_DTYPES,
    ONNX_LINEAR,
    conv_geometry,
    declared_spatial,
    dense_node_geometry,
)
from equivcheck.exploration.sides import Side
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, Shape

__all__ = ["OnnxSide"]


# -- ONNX ------------------------------------------------------------------------------------
class OnnxSide(Side):
    """One linear node of an ONNX model, run alone by ONNX Runtime with the probe weights as graph inputs."""

    framework = "onnxruntime"

    def __init__(self, model: Any, shape: Shape, *, node: str | None = None) -> None:
        model, where = read_onnx_model(model, "model", hint=" (or MODULE:ATTR with --source)")  # a bad path: before onnx
        import onnx

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
        dtype = ONNX_DTYPES.get(dt, "")
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
        trans_b = op == "Gemm" and node_attribute(picked, "transB", 0)
        units = {"Gemm": ws[0] if trans_b else ws[-1], "MatMul": ws[-1], "Conv": ws[0],
                 "ConvTranspose": ws[1] * int(node_attribute(picked, "group", 1))}[op]
        bias_dims = tuple(consts[b_name].dims) if b_name else ()
        has_bias = b_name is not None and math.prod(bias_dims) == units  # else a fixed offset, kept as a constant
        self._bias_shape = bias_dims
        dims = _dims(graph, picked.input[0])
        if op in ("Gemm", "MatMul"):
            features = ws[1] if trans_b else ws[0]
            if op == "Gemm" and node_attribute(picked, "transA", 0):
                raise SpecError(f"{label}: transA=1 reads the batch as its second axis: expected transA=0")
            if (dims is not None and len(dims) != 2) or len(ws) != 2:
                raise SpecError(f"{label} reads an input of rank {len(dims or ())} with a weight of rank {len(ws)}: "
                                "expected (batch, features) times a 2-D weight")
            if dims is not None and dims[1] not in (None, features):
                raise SpecError(f"{label} reads {dims[1]} features but its weight of shape={ws} takes {features}")
            geometry, rank0 = dense_node_geometry(label, shape, features, units, has_bias, _flatten_source(graph, picked.input[0], features))
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
    if producer is None or producer.op_type not in ("Flatten", "Reshape") or node_attribute(producer, "axis", 1) != 1:
        return None
    dims = _dims(graph, producer.input[0])
    if not dims or len(dims) < 3 or None in dims[1:] or math.prod(dims[1:]) != features:
        return None
    return int(dims[1]), tuple(int(d) for d in dims[2:])


def _onnx_conv(label: str, node: Any, ws: tuple[int, ...], dims: tuple[int | None, ...] | None, shape: Shape,
               has_bias: bool) -> ConvSpec:
    rank, transposed, group = len(ws) - 2, node.op_type == "ConvTranspose", int(node_attribute(node, "group", 1))
    if not 1 <= rank <= 3 or (dims is not None and len(dims) != rank + 2):
        raise SpecError(f"{label}: its weight of shape={ws} reads an input of rank {len(dims or ())}: expected a "
                        "1-D to 3-D kernel on a (batch, channels, *spatial) input of 2 more axes")
    ks = tuple(int(k) for k in node_attribute(node, "kernel_shape", ws[2:]))
    cin, cout = (ws[0], ws[1] * group) if transposed else (ws[1] * group, ws[0])
    if shape.channels is not None and shape.channels != cin:
        raise SpecError(f"{label}: channels={shape.channels} but the node reads {cin} channels")
    spatial = declared_spatial(label, shape, tuple(dims[2:]) if dims else (None,) * rank)
    stride, dilation = tuple(node_attribute(node, "strides", [1] * rank)), tuple(node_attribute(node, "dilations", [1] * rank))
    auto_pad = node_attribute(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:  # TensorFlow's "same" puts the odd pad after
        pads = conv_geometry(label, cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding="same").pads()
        padding: Any = pads if auto_pad == "SAME_UPPER" else tuple((hi, lo) for lo, hi in pads)
    elif auto_pad in ("NOTSET", "VALID"):
        flat = list(node_attribute(node, "pads", [0] * (2 * rank))) if auto_pad == "NOTSET" else [0] * (2 * rank)
        padding = tuple(zip(flat[:rank], flat[rank:]))
    else:
        raise SpecError(f"{label}: auto_pad={auto_pad!r} is not supported here: give explicit pads")
    out_pad: Any = 0
    if transposed:
        if node_attribute(node, "output_shape", None) is not None:
            raise SpecError(f"{label}: output_shape= is not supported: expected explicit pads and output_padding")
        if any(lo != hi for lo, hi in padding):
            raise SpecError(f"{label}: pads={padding} are uneven: a transposed conv is supported with equal pads per axis")
        padding, out_pad = tuple(lo for lo, _ in padding), tuple(node_attribute(node, "output_padding", [0] * rank))
    return conv_geometry(label, cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
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

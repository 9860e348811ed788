"""One linear op of a TFLite model as an explore side: :class:`TfliteSide` (see :mod:`equivcheck.exploration.runtimes`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, ProbeError, SpecError, framework_message
from equivcheck.exploration.runtime_geometry import TFLITE_LINEAR, conv_geometry, declared_spatial, dense_node_geometry
from equivcheck.exploration.sides import Side
from equivcheck.specs import CHANNELS_LAST, ConvSpec, Shape

__all__ = ["TfliteSide"]

_TFL_FLOAT32 = 0  # TensorType.FLOAT32


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
        return name, dense_node_geometry(label, shape, w[1], w[0], has_bias, known)[0], w, dims, activation

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
    spatial = declared_spatial(label, shape, tuple(dims[:-1]))
    ks, stride = (w[1], w[2])[keep], (opts.StrideH(), opts.StrideW())[keep]
    dilation = (getattr(opts, "DilationHFactor", lambda: 1)(), getattr(opts, "DilationWFactor", lambda: 1)())[keep]
    padding = "same" if opts.Padding() == 0 else "valid"  # Padding.SAME: TensorFlow's
    if name == "CONV_2D":
        groups = channels // w[3] if channels % w[3] == 0 else 0
        return conv_geometry(label, channels, w[0], ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
                     groups=groups, bias=has_bias)
    if name == "DEPTHWISE_CONV_2D":
        return conv_geometry(label, channels, w[3], ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding,
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
    return conv_geometry(label, w[3], w[0], ks, spatial=spatial, stride=stride, padding=tuple(pads), transposed=True,
                 output_padding=tuple(extra), bias=has_bias)

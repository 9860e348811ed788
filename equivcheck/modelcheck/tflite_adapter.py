"""TFLite models for ``check_models``: a ``.tflite`` path, the model's bytes, or a ``tf.lite.Interpreter``
made from either.

Linear ops of the first subgraph, float only: ``CONV_2D`` (filter ``OHWI``), ``DEPTHWISE_CONV_2D``
(``(1, h, w, C·M)``) and ``FULLY_CONNECTED`` (weights ``(out, in)``), NHWC, as the ``tflite`` preset
says; strides, dilations and SAME/VALID padding from each op's options (read with TensorFlow's own
flatbuffer schema). Capture: one interpreter with every tensor preserved
(``experimental_preserve_all_tensors``); a fully connected op's input is traced back through
``RESHAPE``/``TRANSPOSE`` ops to the map it flattens. Replay: the layer built from its spec on the
``tflite`` backend (a one-layer TFLite model), so fused activations are left out. Any other op
holding float constants (a batch norm left unfused, ``PRELU``...) is listed unchecked.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from equivcheck.modelcheck.adapters import Adapter, ModelError, first_line, outermost, resolve_layout
from equivcheck.modelcheck.layers import Linear, Other, conv_letters, spec_of
from equivcheck.specs import CHANNELS_LAST

__all__ = ["TFLiteAdapter", "is_tflite"]

_FLOAT = {0: "float32", 1: "float16"}  # TensorType FLOAT32, FLOAT16
_LINEAR = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_SHAPE_ONLY = ("RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS")
_NOT_PARAMETERS = ("RESHAPE", "TRANSPOSE", "PAD", "PADV2", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SLICE",
                   "STRIDED_SLICE", "GATHER", "CAST", "DEQUANTIZE", "QUANTIZE")


def is_tflite(model: Any) -> bool:
    """A path ending in ``.tflite``, bytes holding a TFLite flatbuffer, or a ``tf.lite.Interpreter``."""
    if isinstance(model, (str, os.PathLike)):
        return str(os.fspath(model)).lower().endswith(".tflite")
    if isinstance(model, (bytes, bytearray)):
        return len(model) > 8 and bytes(model[4:8]) == b"TFL3"
    return type(model).__name__ == "Interpreter" and "lite" in type(model).__module__


def _content(model: Any, role: str) -> tuple[bytes, str]:
    if isinstance(model, (str, os.PathLike)):
        try:
            with open(model, "rb") as f:
                return f.read(), os.path.splitext(os.path.basename(os.fspath(model)))[0]
        except OSError as exc:
            raise ModelError(f"{role}={os.fspath(model)!r} cannot be read: {exc.strerror}") from None
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "model"
    raise ModelError(f"{role} is a tf.lite.Interpreter: pass the .tflite path or its bytes, which the check reads the "
                     "ops' options from")


class TFLiteAdapter(Adapter):
    framework = backend = "tflite"
    label = "TFLite"
    recast = "a model converted in {}"
    data_format = CHANNELS_LAST

    def __init__(self, model: Any, role: str) -> None:
        super().__init__(model, role)
        try:
            import tensorflow as tf
            from tensorflow.lite.python import schema_py_generated as schema
        except ImportError:
            raise ModelError(f"{role} TFLite model: checking it needs tensorflow: pip install 'equivcheck[tensorflow]'") \
                from None
        self._tf, self._schema = tf, schema
        self._content, self.name = _content(model, role)
        try:
            self._fb = schema.ModelT.InitFromPackedBuf(self._content, 0)
        except Exception as exc:
            raise ModelError(f"{role} TFLite model {self.name!r} cannot be parsed: {first_line(exc)}") from None
        graph = self._fb.subgraphs[0]
        self._graph = graph
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise ModelError(f"{role} TFLite model {self.name!r} has {len(graph.inputs)} inputs and "
                             f"{len(graph.outputs)} outputs: expected one of each")
        kind = graph.tensors[graph.inputs[0]].type
        if kind not in _FLOAT:
            raise ModelError(f"{role} TFLite model {self.name!r} has a quantized input (tensor type {kind}): only float "
                             "models are checked")
        self.dtype = _FLOAT[kind]
        codes = {getattr(schema.BuiltinOperator, n): n for n in dir(schema.BuiltinOperator) if n.isupper()}
        self._ops = []
        for op in graph.operators:
            code = self._fb.operatorCodes[op.opcodeIndex]
            self._ops.append((codes.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM"), op))
        self._producer = {int(t): i for i, (_, op) in enumerate(self._ops) for t in op.outputs}
        self._interpreter: Any = None
        self.others = self._find_others()

    # -- the flatbuffer ---------------------------------------------------------------------------
    def _const(self, index: int) -> np.ndarray | None:
        if index < 0:
            return None
        t = self._graph.tensors[index]
        data = self._fb.buffers[t.buffer].data if t.buffer < len(self._fb.buffers) else None
        if data is None or not len(data):
            return None
        if t.type not in _FLOAT:
            return None
        dtype = np.float32 if t.type == 0 else np.float16
        return np.frombuffer(bytes(bytearray(data)), dtype=dtype).reshape(tuple(int(s) for s in t.shape)).copy()

    def _name(self, i: int) -> str:
        op = self._ops[i][1]
        t = self._graph.tensors[op.outputs[0]]
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        return name or f"{self._ops[i][0]}:{i}"

    def _find_others(self) -> list[Other]:
        found, before = [], 0
        for i, (code, op) in enumerate(self._ops):
            if code in _LINEAR:
                before += 1
                continue
            if code in _NOT_PARAMETERS:
                continue
            held = sum(int(c.size) for t in op.inputs if (c := self._const(int(t))) is not None and c.size > 1)
            if held:
                found.append(Other(self._name(i), code, held, before))
        return outermost(found)

    def _config(self, code: str, op: Any, kernel: np.ndarray) -> dict[str, Any]:
        o = op.builtinOptions
        if code == "FULLY_CONNECTED":
            return {"units": int(kernel.shape[0]), "kernel_layout": "OI"}
        padding = "same" if o.padding == 0 else "valid"
        common = {"kernel_size": tuple(int(k) for k in kernel.shape[1:3]), "stride": (int(o.strideH), int(o.strideW)),
                  "dilation": (int(o.dilationHFactor), int(o.dilationWFactor)), "data_format": CHANNELS_LAST,
                  "padding": padding}
        if code == "CONV_2D":
            return {**common, "in_channels": int(kernel.shape[3]), "out_channels": int(kernel.shape[0]), "groups": 1,
                    "kernel_layout": "OHWI"}
        return {**common, "in_channels": -1, "out_channels": int(kernel.shape[3]), "kernel_layout": "IHWO"}

    def _map_of(self, index: int) -> int:
        """The tensor a fully connected input was reshaped from (back through shape-only ops)."""
        current = index
        while (p := self._producer.get(current)) is not None and self._ops[p][0] in _SHAPE_ONLY:
            current = int(self._ops[p][1].inputs[0])
        return current

    # -- running ----------------------------------------------------------------------------------
    def input_shape(self) -> tuple[int, ...] | None:
        shape = tuple(int(s) for s in self._graph.tensors[self._graph.inputs[0]].shape[1:])
        return shape if shape and all(s > 0 for s in shape) else None

    def fixed_batch(self) -> int | None:
        shape = self._graph.tensors[self._graph.inputs[0]].shape
        return int(shape[0]) if len(shape) and int(shape[0]) > 0 else None

    def run(self, x: np.ndarray, *, outputs: bool = True) -> tuple[np.ndarray, list[Linear]]:
        tf = self._tf
        try:
            if self._interpreter is None:
                self._interpreter = tf.lite.Interpreter(model_content=self._content, experimental_preserve_all_tensors=True)
                self._interpreter.resize_tensor_input(self._graph.inputs[0], list(x.shape))
                self._interpreter.allocate_tensors()
            it = self._interpreter
            it.set_tensor(self._graph.inputs[0], np.ascontiguousarray(x, dtype=np.dtype(self.dtype)))
            it.invoke()
            y = np.array(it.get_tensor(self._graph.outputs[0]))
        except Exception as exc:
            raise ModelError(f"{self.role} TFLite model {self.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        records = []
        for i, (code, op) in enumerate(self._ops):
            if code not in _LINEAR:
                continue
            kernel = self._const(int(op.inputs[1]))
            if kernel is None:
                raise ModelError(f"{self.role} TFLite op {self._name(i)!r} ({code}) reads weights computed in the graph "
                                 "or quantized: expected float constants")
            bias = self._const(int(op.inputs[2])) if len(op.inputs) > 2 else None
            xin = np.array(it.get_tensor(int(op.inputs[0])))
            cfg = self._config(code, op, kernel)
            kind = "dense" if code == "FULLY_CONNECTED" else "conv"
            if code == "DEPTHWISE_CONV_2D":
                c = int(xin.shape[-1])
                cfg.update(in_channels=c, groups=c)
                kind = "depthwise"
            rec = Linear(self._name(i), self.framework, kind, kernel, bias, xin, np.empty(0), cfg, layer=op,
                         index=len(records))
            if kind == "dense":
                source = self._map_of(int(op.inputs[0]))
                map_ = np.array(it.get_tensor(source)) if source != int(op.inputs[0]) else xin
                if xin.ndim > 2:
                    rec.x = xin.reshape(len(xin), -1)
                if map_.ndim >= 3:
                    rec.map_before = map_
                    rec.map_letters = conv_letters(map_.ndim - 2, CHANNELS_LAST)
            resolve_layout(rec)
            if outputs:
                rec.y = self.replay(rec, rec.x)
            records.append(rec)
        return y, records

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        """The layer alone: built from its spec on the ``tflite`` backend (no fused activation)."""
        from equivcheck import backends

        try:
            spec = spec_of(layer, f"{self.role} layer")
            built = backends.get("tflite").build(spec, self.dtype)
            built.set_weights(layer.kernel, layer.bias)
            if layer.kind == "dense" and layer.layout is not None and not layer.layout.is_flat:
                x = np.ascontiguousarray(layer.layout.to_canonical(x))  # a dense spec reads the canonical map
            return np.asarray(built(x))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.role} TFLite layer {layer.name!r} fails alone on an input of shape "
                             f"{tuple(x.shape)}: {first_line(exc)}") from None

    def magnitude_backend(self) -> str:
        import sys

        return "torch" if "torch" in sys.modules else "numpy"

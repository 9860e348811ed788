"""TFLite models for ``check_models``: a ``.tflite`` path, the model's bytes, or a ``tf.lite.Interpreter``
made from either.

Linear ops of the first subgraph, float only: ``CONV_2D`` (filter ``OHWI``), ``DEPTHWISE_CONV_2D``
(``(1, h, w, C·M)``) and ``FULLY_CONNECTED`` (weights ``(out, in)``), NHWC, as the ``tflite`` preset
says; strides, dilations and SAME/VALID padding from each op's options (read with TensorFlow's own
flatbuffer schema). Capture: one interpreter with every tensor preserved
(``experimental_preserve_all_tensors``); a fully connected op's input is traced back through
``RESHAPE``/``TRANSPOSE`` ops to the map it flattens. Replay: the layer built from its spec on the
``tflite`` backend (a one-layer TFLite model), so fused activations are left out. A fully connected op
on a ``(batch, time, features)`` sequence (``keep_num_dims``) is one row per position.

The fused recurrent ops ``UNIDIRECTIONAL_SEQUENCE_LSTM`` (what the converter makes of a tf_keras
``LSTM``) and ``UNIDIRECTIONAL_SEQUENCE_RNN`` are recurrent records (kind ``lstm``/``rnn``, a
``tflite:lstm``/``tflite:rnn`` spec, :mod:`equivcheck.modelcheck.sequence_capture`): the float weights
read from the op's input slots by their position in TFLite's schema (``equivcheck.sequence.tflite``'s
``LSTM_INPUTS``/``RNN_INPUTS``), the op's input and output sequence captured, checked by
:mod:`equivcheck.modelcheck.sequence_pairs`. The op's state variables are reset to zero before every
run (the interpreter keeps them from one invoke to the next). An op outside what the preset describes
(peepholes, projection, layer-norm coefficients, no input gate (CIFG), a non-zero initial state, an
activation other than tanh, time-major, a ``cell_clip`` that can bind on the steps run) stays unchecked
with the reason. Any other op holding float constants (a batch norm left unfused, ``PRELU``,
bidirectional sequence ops...) is listed unchecked.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from equivcheck.modelcheck.adapters import Adapter, ModelError, first_line, outermost, per_position, resolve_layout
from equivcheck.modelcheck.layers import Linear, Other, conv_letters, spec_of
from equivcheck.specs import CHANNELS_LAST

__all__ = ["TFLiteAdapter", "is_tflite"]

_FLOAT = {0: "float32", 1: "float16"}  # TensorType FLOAT32, FLOAT16
_LINEAR = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_SHAPE_ONLY = ("RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS")
_NOT_PARAMETERS = ("RESHAPE", "TRANSPOSE", "PAD", "PADV2", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SLICE",
                   "STRIDED_SLICE", "GATHER", "CAST", "DEQUANTIZE", "QUANTIZE")
#: The fused recurrent ops checked as recurrent records → their cell (the ``tflite:lstm``/``tflite:rnn`` presets).
_SEQUENCE = {"UNIDIRECTIONAL_SEQUENCE_LSTM": "lstm", "UNIDIRECTIONAL_SEQUENCE_RNN": "rnn"}
_STATES = ("output_state", "cell_state", "hidden_state")  # the op's state variables (zero at the start of a run)
#: Ops whose tensors fix where channels sit (a model without any reads its input in its partner's layout).
_LAYOUT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D", "AVERAGE_POOL_2D", "MAX_POOL_2D")


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
        self.has_layout = any(code in _LAYOUT_OPS for code, _ in self._ops)
        self._interpreter: Any = None
        self._unchecked: dict[int, str] = {}  # sequence op → why it is not checked
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

    def _find_others(self, steps: dict[int, int] | None = None) -> list[Other]:
        """The ops holding parameters that no record checks; ``steps``: each sequence op's time steps on this run
        (else from its input tensor's shape in the graph)."""
        found, before = [], 0
        self._unchecked = {}
        for i, (code, op) in enumerate(self._ops):
            if code in _LINEAR:
                before += 1
                continue
            if code in _SEQUENCE:
                why = self._sequence_why(i, None if steps is None else steps.get(i))
                if not why:
                    before += 1
                    continue
                self._unchecked[i] = why
                held = sum(int(c.size) for t in set(int(t) for t in op.inputs) if (c := self._const(t)) is not None)
                found.append(Other(self._name(i), code, held, before, why))
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

    def _sequence_slots(self, i: int) -> dict[str, int]:
        """A fused recurrent op's input slots by their names in TFLite's schema (-1: left out); unnamed optional
        slots (peepholes, projection, layer norm) under ``#k``."""
        from equivcheck.sequence.tflite import LSTM_INPUTS, RNN_INPUTS

        code, op = self._ops[i]
        names = LSTM_INPUTS if _SEQUENCE[code] == "lstm" else RNN_INPUTS
        slots = [int(t) for t in op.inputs]
        slots += [-1] * (len(names) - len(slots))  # an op of an older version: fewer (optional) inputs
        return {name or f"#{k}": slot for k, (name, slot) in enumerate(zip(names, slots))}

    def _sequence_spec(self, i: int) -> Any:
        from equivcheck.sequence.presets import spec

        kind = _SEQUENCE[self._ops[i][0]]
        slots = self._sequence_slots(i)
        w = self._const(slots["input_to_forget_weights" if kind == "lstm" else "weights"])
        assert w is not None
        return spec(f"tflite:{kind}", input_size=int(w.shape[1]), units=int(w.shape[0]))

    def _sequence_why(self, i: int, steps: int | None = None) -> str:
        """Why a fused recurrent op is not what its ``tflite:lstm``/``tflite:rnn`` preset describes, or "".
        ``steps``: the time steps it runs on (where known), for the cell clip."""
        from equivcheck.errors import EquivcheckError
        from equivcheck.sequence.named import tensor_shapes

        code, op = self._ops[i]
        lstm = _SEQUENCE[code] == "lstm"
        slots = self._sequence_slots(i)
        if len(op.inputs) > len(slots):
            return f"{code} with {len(op.inputs)} inputs: expected at most {len(slots)}"
        o = op.builtinOptions
        if o is None:
            return f"{code} without its options: not checked"
        acts = {getattr(self._schema.ActivationFunctionType, n): n for n in dir(self._schema.ActivationFunctionType)
                if n.isupper()}
        if o.fusedActivationFunction != self._schema.ActivationFunctionType.TANH:
            return f"{code} with activation {acts.get(o.fusedActivationFunction, o.fusedActivationFunction)}: only TANH is checked"
        if o.timeMajor:
            return f"{code} with time_major=True: only batch-major (batch, time, features) is checked"
        if getattr(o, "diagonalRecurrentTensors", False):
            return f"{code} with diagonal recurrent weights: not checked yet"
        if lstm:
            for ks, what in (((9, 10, 11), "peepholes (cell_to_*_weights)"),
                             ((16, 17), "a projection (projection_weights/bias)"),
                             ((20, 21, 22, 23), "layer-norm coefficients")):
                if any(slots[f"#{k}"] >= 0 for k in ks):
                    return f"{code} with {what}: not checked yet"
            if slots["input_to_input_weights"] < 0 or slots["recurrent_to_input_weights"] < 0:
                return f"{code} without input gate weights (CIFG: input and forget gates coupled): not checked yet"
        x = self._graph.tensors[slots["input"]] if slots["input"] >= 0 else None
        if x is None or len(x.shape) != 3:
            return f"{code} on a {0 if x is None else len(x.shape)}-D input: expected (batch, time, features)"
        for name, slot in slots.items():
            if name == "input" or name.startswith("#") or name in _STATES:
                continue
            c = self._const(slot)
            if c is None:
                return f"{code} whose {name} is not a float constant (computed in the graph or quantized): not checked"
            if c.dtype != np.float32:
                return f"{code} with {c.dtype} weights: TFLite's fused recurrent kernels run float32 only"
        try:
            s = self._sequence_spec(i)
            shapes = tensor_shapes(s)
        except (EquivcheckError, IndexError) as exc:  # IndexError: a weight of the wrong rank
            return f"{code} not described by a preset: {first_line(exc)}"
        for name, shape in shapes.items():
            held = self._const(slots[name])
            if held is None or held.shape != shape:
                return f"{code} {name} of shape {None if held is None else held.shape}: expected {shape}"
        for name in _STATES:
            slot = slots.get(name, -1)
            if slot < 0:
                continue
            held = self._const(slot)
            if held is not None and np.any(held != 0):
                return f"{code} with a non-zero initial {name}: only a zero initial state is checked"
            if held is None and not self._graph.tensors[slot].isVariable:
                return f"{code} whose initial {name} is computed in the graph: only a zero initial state is checked"
        clip = float(getattr(o, "cellClip", 0.0) or 0.0) if lstm else 0.0
        if steps is None and int(x.shape[1]) > 0:
            steps = int(x.shape[1])
        if clip > 0 and steps is not None and steps > clip:
            return (f"{code} with cell_clip={clip:g} on {steps} steps: the clip can bind after {math.floor(clip)} steps "
                    f"(|c_t| < t), and the preset has none; check on at most {math.floor(clip)} steps")
        return ""

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
            it.reset_all_variables()  # a fused recurrent op's state: zero at the start of every run, as in the model
            it.set_tensor(self._graph.inputs[0], np.ascontiguousarray(x, dtype=np.dtype(self.dtype)))
            it.invoke()
            y = np.array(it.get_tensor(self._graph.outputs[0]))
        except Exception as exc:
            raise ModelError(f"{self.role} TFLite model {self.name!r} fails on an input of shape {tuple(x.shape)}: "
                             f"{first_line(exc)}") from None
        steps = {i: int(it.get_tensor(int(op.inputs[0])).shape[1]) for i, (code, op) in enumerate(self._ops)
                 if code in _SEQUENCE and len(it.get_tensor(int(op.inputs[0])).shape) == 3}
        self.others = self._find_others(steps)
        records = []
        for i, (code, op) in enumerate(self._ops):
            if code in _SEQUENCE and i not in self._unchecked:
                records.append(self._sequence_record(i, len(records)))
                continue
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
            if kind == "dense" and xin.ndim > 2 and xin.shape[-1] == kernel.shape[1] and xin.size != len(xin) * kernel.shape[1]:
                per_position(rec)  # on a sequence's features (keep_num_dims): one row per position
            elif kind == "dense":
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

    def _sequence_record(self, i: int, index: int) -> Linear:
        """A fused recurrent op as it ran: its preset spec, its weights by their slot names, its input and output
        sequences (batch, time, features)."""
        from equivcheck.modelcheck.sequence_capture import sequence_record
        from equivcheck.sequence.named import tensor_shapes

        code, op = self._ops[i]
        s = self._sequence_spec(i)
        slots = self._sequence_slots(i)
        named = {}
        for name in tensor_shapes(s):
            held = self._const(slots[name])
            assert held is not None  # _sequence_why found every weight
            named[name] = held
        it = self._interpreter
        x = np.array(it.get_tensor(slots["input"]))
        y = np.array(it.get_tensor(int(op.outputs[0])))
        return sequence_record(self._name(i), self.framework, _SEQUENCE[code], s, named, (x,), y, code, op, index)

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

"""TFLite's fused recurrent ops, written from a spec and its named weights and run on the interpreter.

TFLite's runtime has two fused recurrent builtins for float layers: ``UNIDIRECTIONAL_SEQUENCE_LSTM``
(what ``TFLiteConverter`` emits for a Keras 2 (tf_keras) LSTM) and ``UNIDIRECTIONAL_SEQUENCE_RNN``
(the interpreter runs it; no Keras layer converts to it). There is no fused GRU op: the converter
lowers a GRU (and a Keras 3 LSTM or SimpleRNN) to a ``WHILE`` loop of builtin ops whose weights are
unnamed constants of the loop body, so no ``tflite:gru`` preset.

The weights are named as the op's inputs in TFLite's kernels (``lstm_shared.h``:
``kInputToInputWeightsTensor`` → ``input_to_input_weights`` (units, in), … ``kCellGateBiasTensor``
→ ``cell_gate_bias`` (units,); ``unidirectional_sequence_rnn.cc``: ``weights``, ``recurrent_weights``,
``bias``), ``fw_``/``bw_`` in front for a bidirectional layer (the bidirectional kernels' names).
The model is written straight from TFLite's flatbuffer schema (ai_edge_litert's copy, else
TensorFlow's): one op, batch-major, tanh, no clipping, peepholes, projection or layer norm, the
states zero-initialised variable tensors. Writing it takes about a millisecond, so each call writes
its own (no converter, no template). A bidirectional layer runs the op on the input and, with the
``bw_`` weights, on the input reversed in time, reverses that output back and concatenates — what
the converter emits for a Keras ``Bidirectional`` (``REVERSE_V2``, two ops, ``CONCATENATION``), done
around the model in numpy. The converter writes ``cell_clip=10`` for a Keras LSTM; the cell state
satisfies |c_t| < t, so that clip cannot bind within 10 steps. float32 only: the float kernels take
no float16 or bfloat16 tensors (``tests/sequence/test_tflite.py`` asks the runtime).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.dtypes import np_dtype
from equivcheck.errors import BackendUnavailable, SpecError
from equivcheck.sequence.named import tensor_shapes
from equivcheck.sequence.specs import RecurrentSpec

__all__ = ["LSTM_INPUTS", "RNN_INPUTS", "model", "run", "schema"]

#: The fused LSTM op's 24 inputs in order (lstm_shared.h); "" marks the optional ones left out here.
LSTM_INPUTS = ("input", "input_to_input_weights", "input_to_forget_weights", "input_to_cell_weights",
               "input_to_output_weights", "recurrent_to_input_weights", "recurrent_to_forget_weights",
               "recurrent_to_cell_weights", "recurrent_to_output_weights", "", "", "",  # cell_to_* peepholes
               "input_gate_bias", "forget_gate_bias", "cell_gate_bias", "output_gate_bias",
               "", "",  # projection weights and bias
               "output_state", "cell_state", "", "", "", "")  # state variables; layer-norm coefficients
#: The fused RNN op's inputs in order (unidirectional_sequence_rnn.cc).
RNN_INPUTS = ("input", "weights", "recurrent_weights", "bias", "hidden_state")
_STATES = ("output_state", "cell_state", "hidden_state")


def schema() -> Any:
    """TFLite's flatbuffer schema module (``schema_py_generated``): ai_edge_litert's, else TensorFlow's."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        from equivcheck.backends import get

        get("tflite").load()  # TensorFlow, imported quietly
        try:
            from tensorflow.lite.python import schema_py_generated
        except ImportError as exc:
            raise BackendUnavailable(f"tflite backend: {exc}; pip install ai-edge-litert or tensorflow-cpu") from None
    return schema_py_generated


def model(spec: RecurrentSpec, weights: dict[str, np.ndarray], batch: int, steps: int, *, dtype: str = "float32") -> bytes:
    """The flatbuffer of one unidirectional fused op of ``spec``'s cell, ``weights`` by their unprefixed names.

    ``dtype`` is the type of every float tensor (the runtime takes float32; others are for asking it).
    """
    import flatbuffers

    s = schema()
    if spec.cell not in ("lstm", "rnn"):
        raise SpecError(f"cell={spec.cell!r}: TFLite's runtime has no fused {spec.cell.upper()} op; expected lstm or rnn")
    types = {"float32": s.TensorType.FLOAT32, "float16": s.TensorType.FLOAT16, "bfloat16": s.TensorType.BFLOAT16}
    if dtype not in types:
        raise SpecError(f"dtype={dtype!r} cannot be written into a TFLite model here: expected one of {', '.join(types)}")
    kind = (types[dtype], np_dtype(dtype))
    H, I = spec.units, spec.input_size  # noqa: E741
    tensors: list[Any] = []
    buffers = [s.BufferT()]  # buffer 0: the empty one, for tensors without data

    def tensor(name: str, shape: tuple[int, ...], data: np.ndarray | None = None, variable: bool = False) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type, t.isVariable, t.buffer = name, list(shape), kind[0], variable, 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data, dtype=kind[1]).tobytes(), dtype=np.uint8)
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    shapes = tensor_shapes(spec.replace(bidirectional=False))
    slots = []
    for name in LSTM_INPUTS if spec.cell == "lstm" else RNN_INPUTS:
        if name == "input":
            slots.append(tensor(name, (batch, steps, I)))
        elif name in _STATES:
            slots.append(tensor(name, (batch, H), variable=True))
        elif name:
            if weights[name].shape != shapes[name]:
                raise SpecError(f"{name} shape={weights[name].shape} is not the expected {shapes[name]}")
            slots.append(tensor(name, shapes[name], weights[name]))
        else:
            slots.append(-1)
    out = tensor("output", (batch, steps, H))
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, slots, [out]
    if spec.cell == "lstm":
        code = s.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_LSTM
        op.builtinOptionsType = s.BuiltinOptions.UnidirectionalSequenceLSTMOptions
        op.builtinOptions = s.UnidirectionalSequenceLSTMOptionsT()
        op.builtinOptions.cellClip = op.builtinOptions.projClip = 0.0
    else:
        code = s.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_RNN
        op.builtinOptionsType = s.BuiltinOptions.SequenceRNNOptions
        op.builtinOptions = s.SequenceRNNOptionsT()
    op.builtinOptions.fusedActivationFunction = s.ActivationFunctionType.TANH
    op.builtinOptions.timeMajor = False
    opcode = s.OperatorCodeT()
    opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, code, 1
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators, graph.name = tensors, [slots[0]], [out], [op], "main"
    m = s.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers, m.description = 3, [opcode], [graph], buffers, "equivcheck"
    builder = flatbuffers.Builder(1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _invoke(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    from equivcheck.backends.tflite import interpreter_class

    it = interpreter_class()(model_content=flatbuffer, num_threads=1)
    it.allocate_tensors()
    it.reset_all_variables()  # the zero initial state (a variable keeps its value from one invoke to the next)
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return np.array(it.get_tensor(it.get_output_details()[0]["index"]))


def run(spec: RecurrentSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str = "float32") -> np.ndarray:
    """``spec``'s layer on TFLite's interpreter: (batch, time, directions·units) float64 out."""
    if not isinstance(spec, RecurrentSpec) or spec.storage != "tflite":
        raise SpecError(f"spec={spec!r} is not a tflite recurrent spec: expected storage='tflite'")
    if dtype != "float32":
        raise SpecError(f"dtype={dtype!r}: TFLite's fused LSTM and RNN kernels run float layers in float32 only")
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != spec.input_size:
        raise SpecError(f"inputs shape={x.shape} is not (batch, time, {spec.input_size}) for {spec.describe()}")
    outs = []
    for d in range(spec.directions):
        p = ("fw_", "bw_")[d] if spec.bidirectional else ""
        own = {k[len(p):]: np.asarray(v, dtype=np.float32) for k, v in weights.items() if k.startswith(p)}
        xd = x if d == 0 else np.ascontiguousarray(x[:, ::-1])
        y = _invoke(model(spec, own, x.shape[0], x.shape[1]), xd)
        outs.append(y if d == 0 else y[:, ::-1])
    return np.concatenate(outs, axis=-1).astype(np.float64)

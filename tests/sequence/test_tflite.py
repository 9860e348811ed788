"""``tflite:lstm`` and ``tflite:rnn`` on TFLite's real interpreter: the fused ops' named inputs, what the converter
emits for a Keras LSTM (and for a GRU, which has no fused op), and which dtypes the runtime takes (asked, not assumed)."""

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence.backends import run
from equivcheck.sequence.named import tensor_shapes
from equivcheck.sequence.verify import draw, error_bound

pytest.importorskip("tensorflow", reason="tensorflow not installed: pip install 'equivcheck[tflite]'")
tflite = pytest.importorskip("equivcheck.sequence.tflite")

KW = dict(input_size=3, units=4)


def interpreter(flatbuffer):
    from equivcheck.backends.tflite import interpreter_class

    it = interpreter_class()(model_content=flatbuffer, num_threads=1)
    it.allocate_tensors()
    return it


def invoke(it, x):
    it.set_tensor(it.get_input_details()[0]["index"], np.asarray(x, np.float32))
    it.invoke()
    return np.array(it.get_tensor(it.get_output_details()[0]["index"]), dtype=np.float64)


# -- the runner against the float64 reference ------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_interpreter_runs_the_named_weights_as_the_reference_reads_them(cell, bidirectional):
    s = ec.spec(f"tflite:{cell}", bidirectional=bidirectional, **KW)
    w, x = draw(s, seed=3)
    y = run("tflite", s, w, x)
    assert y.shape == (2, 5, s.directions * 4)
    assert np.all(np.abs(y - run("numpy", s, w, x)) <= error_bound(s, w, x, "float32"))
    w2 = dict(w)  # a gate's tensors moved to another's name: the op reads them elsewhere
    if cell == "lstm":
        p = "bw_" if bidirectional else ""
        w2[f"{p}input_to_forget_weights"], w2[f"{p}input_to_cell_weights"] = w[f"{p}input_to_cell_weights"], w[f"{p}input_to_forget_weights"]
    else:
        w2["fw_weights" if bidirectional else "weights"] = w["fw_weights" if bidirectional else "weights"][::-1]
    assert np.abs(run("tflite", s, w2, x) - y).max() > 1e-3


def test_state_starts_at_zero_on_every_call():
    s = ec.spec("tflite:lstm", **KW)
    w, x = draw(s, seed=4)
    flat = tflite.model(s, w, 2, 5)
    it = interpreter(flat)
    first, again = invoke(it, x), invoke(it, x)  # the op's state is a variable tensor: it carries over
    assert np.abs(first - again).max() > 1e-4
    np.testing.assert_array_equal(run("tflite", s, w, x), run("tflite", s, w, x))
    np.testing.assert_allclose(run("tflite", s, w, x), first, rtol=0, atol=0)


@pytest.mark.parametrize(("source", "cell"), [("torch", "lstm"), ("onnx", "lstm"), ("keras", "rnn")])
def test_verify_pair_from_the_reference_passes_and_rejects_every_mutant(source, cell):
    src, dst = ec.spec(f"{source}:{cell}", **KW), ec.spec(f"tflite:{cell}", **KW)
    case = ec.verify_pair(src, dst, source_backend="numpy", target_backend="tflite")
    assert case.verdict == "pass", case.reason
    assert case.target_backend == "tflite" and case.mutations
    assert all(m.outcome == "rejected" for m in case.mutations)


def test_keras_lstm_to_tflite_lstm_passes_on_both_real_runtimes():
    pytest.importorskip("keras", reason="keras not installed: pip install 'equivcheck[tensorflow]'")
    case = ec.verify_pair(ec.spec("keras:lstm", input_size=5, units=6), ec.spec("tflite:lstm", input_size=5, units=6),
                          source_backend="keras", target_backend="tflite")
    assert case.verdict == "pass", case.reason
    assert (case.source_backend, case.target_backend, case.dtype) == ("keras", "tflite", "float32")
    assert {m.name for m in case.mutations} >= {"gate_order:iofg", "kernel_not_transposed", "recurrent_not_transposed"}


def test_a_wrong_converter_fails_naming_the_mistake():
    src, dst = ec.spec("torch:lstm", **KW), ec.spec("tflite:lstm", **KW)

    def onnx_order(w):  # the blocks read as ONNX's i,o,f,c
        return ec.convert(src.replace(gate_order="iofg"), dst, w)

    case = ec.verify_pair(src, dst, converter=onnx_order, source_backend="numpy", target_backend="tflite")
    assert case.verdict == "fail" and case.diagnosis["mutant"] == "gate_order:iofg"


# -- what the runtime takes: asked ---------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_runtime_refuses_low_precision_so_the_runner_does(cell, dtype):
    s = ec.spec(f"tflite:{cell}", **KW)
    w, _ = draw(s)
    with pytest.raises((RuntimeError, ValueError), match=r"Float32|FLOAT32"):
        interpreter(tflite.model(s, w, 2, 5, dtype=dtype))
    case = ec.verify_pair(ec.spec(f"torch:{cell}", **KW), s, source_backend="numpy", target_backend="tflite", dtype=dtype)
    assert case.verdict == "skip" and "tflite does not run" in case.reason
    with pytest.raises(ec.SpecError, match=rf"^dtype='{dtype}' does not run on backend='tflite'"):
        run("tflite", s, w, np.zeros((1, 3, 3)), dtype=dtype)


# -- names, specs, plan ----------------------------------------------------------------------
def test_storage_names_are_the_ops_input_names():
    lstm = tensor_shapes(ec.spec("tflite:lstm", **KW))
    assert list(lstm) == [n for n in tflite.LSTM_INPUTS if n and n not in ("input", "output_state", "cell_state")]
    assert lstm["input_to_cell_weights"] == (4, 3) and lstm["recurrent_to_output_weights"] == (4, 4)
    assert lstm["forget_gate_bias"] == (4,)
    assert list(tensor_shapes(ec.spec("tflite:rnn", **KW))) == list(tflite.RNN_INPUTS[1:4])
    both = tensor_shapes(ec.spec("tflite:rnn", bidirectional=True, **KW))
    assert list(both) == ["fw_weights", "fw_recurrent_weights", "fw_bias", "bw_weights", "bw_recurrent_weights", "bw_bias"]


def test_bad_specs_say_why():
    with pytest.raises(ec.SpecError, match=r"^spec name='tflite:gru': TFLite's runtime has no fused GRU op"):
        ec.spec("tflite:gru", **KW)
    with pytest.raises(ec.SpecError, match=r"^storage='tflite' has no gru layer"):
        ec.spec("keras:gru", reset_after=False, **KW).replace(storage="tflite", name="")
    with pytest.raises(ec.SpecError, match=r"^storage='tflite' keeps one bias per gate"):
        ec.spec("tflite:lstm", **KW).replace(summed_bias=False)
    s = ec.spec("tflite:lstm", **KW)
    with pytest.raises(ec.SpecError, match=r"^dtype='float64': TFLite's fused LSTM and RNN kernels run float layers in float32"):
        tflite.run(s, draw(s)[0], np.zeros((1, 3, 3)), "float64")


def test_cli_plan_torch_to_tflite(capsys):
    from equivcheck.cli import main

    assert main(["plan", "--from", "torch:lstm", "--to", "tflite:lstm", "--input-size", "32", "--units", "64"]) == 0
    out = capsys.readouterr().out
    assert "out['input_to_cell_weights'] = w['weight_ih_l0'].reshape(4, 64, 32)[2]" in out
    assert "out['forget_gate_bias'] = np.stack([w['bias_ih_l0'], w['bias_hh_l0']]).sum(0).reshape(4, 64)[1]" in out


# -- what the converter writes -------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_keras2_lstm():
    """A tf_keras (Keras 2) LSTM with drawn weights, converted once by TFLiteConverter: (weights, model bytes)."""
    tf = ec.backends.get("tflite").load()
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras not installed: pip install 'equivcheck[tfkeras]'")
    layer = tf_keras.layers.LSTM(4, return_sequences=True)
    layer.build((2, 5, 3))
    rng = np.random.default_rng(0)
    for v in layer.weights:
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.5)
    weights = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in layer.weights}
    fn = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec((2, 5, 3), tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], layer)
    return weights, converter.convert()


def test_converter_writes_the_fused_op_with_the_planned_tensors_in_its_named_slots(converted_keras2_lstm):
    weights, flat = converted_keras2_lstm
    assert set(weights) == {"kernel", "recurrent_kernel", "bias"}
    s = tflite.schema()
    m = s.ModelT.InitFromPackedBuf(flat, 0)
    (graph,) = m.subgraphs
    (op,) = graph.operators
    assert m.operatorCodes[op.opcodeIndex].builtinCode == s.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_LSTM
    planned = ec.convert(ec.spec("keras:lstm", **KW), ec.spec("tflite:lstm", **KW), weights)
    for slot, name in zip(op.inputs, tflite.LSTM_INPUTS):
        if name in planned:
            t = graph.tensors[slot]
            stored = np.frombuffer(bytes(m.buffers[t.buffer].data), np.float32).reshape(t.shape)
            np.testing.assert_array_equal(stored, planned[name], err_msg=name)
        elif name in ("output_state", "cell_state"):
            assert graph.tensors[slot].isVariable
        elif name != "input":
            assert slot == -1, name
    ours = s.ModelT.InitFromPackedBuf(tflite.model(ec.spec("tflite:lstm", **KW), planned, 2, 5), 0).subgraphs[0].operators[0]
    theirs = vars(op.builtinOptions)
    assert {**theirs, "cellClip": 0.0} == vars(ours.builtinOptions)
    assert theirs["cellClip"] == 10.0  # |c_t| < t: cannot bind within 10 steps


def test_our_model_computes_what_the_converted_one_does(converted_keras2_lstm):
    weights, flat = converted_keras2_lstm
    s = ec.spec("tflite:lstm", **KW)
    x = np.random.default_rng(1).standard_normal((2, 5, 3))
    want = invoke(interpreter(flat), x)
    got = run("tflite", s, ec.convert(ec.spec("keras:lstm", **KW), s, weights), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_converter_has_no_fused_gru_it_writes_a_loop_the_interpreter_runs():
    keras = pytest.importorskip("keras", reason="keras not installed: pip install 'equivcheck[tensorflow]'")
    tf = ec.backends.get("tflite").load()
    inputs = keras.Input((5, 3), batch_size=2)
    layer = keras.Model(inputs, keras.layers.GRU(4, return_sequences=True)(inputs))
    flat = tf.lite.TFLiteConverter.from_keras_model(layer).convert()
    s = tflite.schema()
    m = s.ModelT.InitFromPackedBuf(flat, 0)
    codes = {c.builtinCode for c in m.operatorCodes}
    ops = s.BuiltinOperator
    assert ops.WHILE in codes and ops.CUSTOM not in codes  # builtin ops only: no Flex
    assert not codes & {ops.UNIDIRECTIONAL_SEQUENCE_LSTM, ops.UNIDIRECTIONAL_SEQUENCE_RNN, ops.BIDIRECTIONAL_SEQUENCE_LSTM}
    x = np.random.default_rng(2).standard_normal((2, 5, 3))
    np.testing.assert_allclose(invoke(interpreter(flat), x), np.asarray(layer(x.astype(np.float32))), atol=1e-5)

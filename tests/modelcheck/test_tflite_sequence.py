"""TFLite's fused recurrent ops as checked pairs in ``check_models``: ``UNIDIRECTIONAL_SEQUENCE_LSTM`` from the
converter, ``UNIDIRECTIONAL_SEQUENCE_RNN`` written from its schema, and the variants left unchecked with a reason.

The converter (TF 2.21) fuses an LSTM only from a tf_keras (Keras 2) layer, with the batch fixed in the model's
input: a Keras 3 ``LSTM`` becomes a ``WHILE`` loop of builtin ops, and an undefined batch fails to convert
(``TensorListReserve ... element_shape to be static``). So the port writes a tf_keras model; its Keras 3 twin (the
same weights) is the Keras source of the direct Keras → TFLite check. No Keras layer converts to the fused RNN op.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

SHAPE = (2, 5, 4)  # (batch, time, features)
UNITS = 3
LSTM_OP = "UNIDIRECTIONAL_SEQUENCE_LSTM"


@pytest.fixture(scope="module")
def ec(torch, tf):
    import equivcheck

    return equivcheck


@pytest.fixture(scope="module")
def tf_keras(tf):
    return pytest.importorskip("tf_keras", reason="tf_keras not installed: pip install 'equivcheck[tfkeras]'")


@pytest.fixture(scope="module")
def net(torch):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(SHAPE[2], UNITS, batch_first=True)
            self.fc = nn.Linear(UNITS, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    torch.manual_seed(0)
    return Net().eval()


def _weights(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def port(tf_keras, net, reads="ifgo"):
    """The converter under test: torch ``LSTM`` + ``Linear`` → tf_keras ``LSTM(return_sequences=True)`` + ``Dense``.
    ``reads``: the gate order it takes torch's four blocks to be in (torch's is i,f,g,o; Keras writes i,f,c,o)."""
    p = _weights(net)

    def gates(w):
        blocks = np.split(w, 4, axis=0)
        return np.concatenate([blocks[reads.index(g)] for g in "ifgo"], axis=0)

    inp = tf_keras.Input(SHAPE[1:], batch_size=SHAPE[0])
    h = tf_keras.layers.LSTM(UNITS, return_sequences=True, name="lstm")(inp)
    model = tf_keras.Model(inp, tf_keras.layers.Dense(2, name="fc")(h))
    model.get_layer("lstm").set_weights([gates(p["lstm.weight_ih_l0"]).T, gates(p["lstm.weight_hh_l0"]).T,
                                         gates(p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"])])
    model.get_layer("fc").set_weights([p["fc.weight"].T, p["fc.bias"]])
    return model


@pytest.fixture(scope="module")
def converted(tf, tf_keras, net):
    """The right port and one reading torch's gates as ONNX's i,o,f,c, each converted once: name → .tflite bytes."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, reads in (("right", "ifgo"), ("wrong", "iofg")):
            out[name] = tf.lite.TFLiteConverter.from_keras_model(port(tf_keras, net, reads)).convert()
    return out


def check(ec, source, converted, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation, preserve_all_tensors
        return ec.check_models(source, converted, **kw)


def adapter(tflite_model):
    from equivcheck.modelcheck.tflite_adapter import TFLiteAdapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TFLiteAdapter(tflite_model, "converted")


def run(a, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return a.run(np.asarray(x, np.float32))


def op_codes(flat):
    from equivcheck.sequence import tflite

    s = tflite.schema()
    m = s.ModelT.InitFromPackedBuf(flat, 0)
    names = {getattr(s.BuiltinOperator, n): n for n in dir(s.BuiltinOperator) if n.isupper()}
    return [names[max(m.operatorCodes[o.opcodeIndex].builtinCode, m.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)]
            for g in m.subgraphs for o in g.operators]


# -- torch → (Keras) → TFLite, converted ---------------------------------------------------------
def test_the_converter_emits_the_fused_lstm_op(ec, converted):
    assert op_codes(converted["right"]) == [LSTM_OP, "FULLY_CONNECTED"]  # no WHILE loop


def test_torch_lstm_to_tflite_passes_with_the_lstm_a_checked_pair(ec, net, converted):
    result = check(ec, net, converted["right"], input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.kind, r.verdict) for r in result.layers] == [("lstm", "lstm", "pass"), ("fc", "dense", "pass")]
    assert result.layers[0].converted == "tfl.unidirectional_sequence_lstm"
    assert "tflite:lstm(input_size=4, units=3" in result.layers[0].notes[0]
    assert not result.unpaired, result.render()  # every parameter accounted for


def test_gates_reordered_in_the_port_fail_naming_the_lstm_and_the_gate_order(ec, net, converted):
    result = check(ec, net, converted["wrong"], input_shape=SHAPE)
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert (first.source, first.converted, first.kind) == ("lstm", "tfl.unidirectional_sequence_lstm", "lstm")
    assert "gate order" in first.diagnosis and "i,o,f,c" in first.diagnosis, first.diagnosis
    assert "out['input_to_forget_weights'] = w['weight_ih_l0'].reshape(4, 3, 4)[1]" in first.mapping


def test_the_tflite_model_as_source_pairs_the_other_way(ec, net, converted):
    result = check(ec, converted["right"], net)  # the input shape from the TFLite graph
    assert result.verdict == "pass", result.render()
    assert (result.layers[0].source, result.layers[0].converted) == ("tfl.unidirectional_sequence_lstm", "lstm")


# -- Keras → TFLite, directly ------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_model(keras, tf_keras, net):
    """The Keras 3 source: the tf_keras port's weights in Keras 3 layers."""
    inp = keras.Input(SHAPE[1:])
    h = keras.layers.LSTM(UNITS, return_sequences=True, name="lstm")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="fc")(h))
    model.set_weights(port(tf_keras, net).get_weights())
    return model


def test_keras_lstm_to_tflite_passes_and_a_wrong_conversion_fails(ec, keras_model, converted):
    result = check(ec, keras_model, converted["right"])
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.kind, r.verdict) for r in result.layers] == [("lstm", "lstm", "pass"), ("fc", "dense", "pass")]
    assert "keras:lstm" in result.layers[0].notes[0] and not result.unpaired
    wrong = check(ec, keras_model, converted["wrong"])
    assert wrong.verdict == "fail" and wrong.first_divergence.source == "lstm", wrong.render()
    assert "gate order" in wrong.first_divergence.diagnosis


# -- the record -------------------------------------------------------------------------------
def test_the_record_holds_the_ops_weights_by_slot_name_and_starts_from_zero_state(ec, net, converted, torch):
    a = adapter(converted["right"])
    x = np.random.default_rng(3).standard_normal(SHAPE)
    y, records = run(a, x)
    assert [r.kind for r in records] == ["lstm", "dense"] and not a.others
    lstm = records[0]
    torch_spec = ec.spec("torch:lstm", input_size=SHAPE[2], units=UNITS)
    tflite_spec = ec.spec("tflite:lstm", input_size=SHAPE[2], units=UNITS)
    assert lstm.config["sequence"] == tflite_spec and lstm.config["class"] == LSTM_OP
    planned = ec.convert(torch_spec, tflite_spec, {k[5:]: v for k, v in _weights(net).items() if k.startswith("lstm.")})
    assert set(lstm.config["named"]) == set(planned)
    for name, value in planned.items():  # each slot read under its own name: a slot off by one fails here
        np.testing.assert_allclose(lstm.config["named"][name], value, rtol=0, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(lstm.config["inputs"][0], x.astype(np.float32))
    with torch.no_grad():
        want = net.lstm(torch.tensor(x, dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(lstm.y, want, atol=1e-5)
    assert records[1].x.shape == (SHAPE[0] * SHAPE[1], UNITS)  # the dense op on the sequence: one row per step
    again, _ = run(a, x)  # the op's state variables carry over between invokes unless reset
    np.testing.assert_array_equal(again, y)


# -- the fused RNN op, written from the schema ---------------------------------------------------
@pytest.fixture(scope="module")
def rnn_net(torch):
    class RnnNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.RNN(SHAPE[2], UNITS, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(1)
    return RnnNet().eval()


def test_a_fused_rnn_op_pairs_with_torch_rnn_and_a_wrong_one_fails(ec, rnn_net):
    from equivcheck.sequence import tflite

    src = ec.spec("torch:rnn", input_size=SHAPE[2], units=UNITS)
    dst = ec.spec("tflite:rnn", input_size=SHAPE[2], units=UNITS)
    w = ec.convert(src, dst, {k[4:]: v for k, v in _weights(rnn_net).items()})
    flat = tflite.model(dst, w, SHAPE[0], SHAPE[1])
    assert op_codes(flat) == ["UNIDIRECTIONAL_SEQUENCE_RNN"]
    result = check(ec, rnn_net, flat, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted, r.kind) for r in result.layers] == [("rnn", "output", "rnn")]
    bad = tflite.model(dst, {**w, "recurrent_weights": w["recurrent_weights"].T.copy()}, SHAPE[0], SHAPE[1])
    wrong = check(ec, rnn_net, bad, input_shape=SHAPE)
    assert wrong.verdict == "fail" and wrong.first_divergence.kind == "rnn", wrong.render()


# -- variants the preset does not describe: unchecked, with the reason -----------------------------
def _lstm_model(ec, change):
    """A one-op fused LSTM model (2 × 5 steps) with ``change(schema, op, graph, model)`` applied to its flatbuffer."""
    import flatbuffers

    from equivcheck.sequence import tflite
    from equivcheck.sequence.verify import draw

    s = ec.spec("tflite:lstm", input_size=SHAPE[2], units=UNITS)
    w, _ = draw(s, seed=2)
    schema = tflite.schema()
    m = schema.ModelT.InitFromPackedBuf(tflite.model(s, w, SHAPE[0], SHAPE[1]), 0)
    graph = m.subgraphs[0]
    change(schema, graph.operators[0], graph, m)
    builder = flatbuffers.Builder(1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _option(key, value):
    def change(schema, op, graph, m):
        setattr(op.builtinOptions, key, value)

    return change


def _peephole(schema, op, graph, m):
    op.inputs = np.array(op.inputs)
    op.inputs[9] = op.inputs[12]  # cell_to_input_weights: a (units,) tensor


def _cifg(schema, op, graph, m):
    op.inputs = np.array(op.inputs)
    op.inputs[1] = op.inputs[5] = -1  # input_to_input_weights, recurrent_to_input_weights


def _initial_state(schema, op, graph, m):
    b = schema.BufferT()
    b.data = np.frombuffer(np.full((SHAPE[0], UNITS), 0.5, np.float32).tobytes(), np.uint8)
    m.buffers.append(b)
    graph.tensors[op.inputs[19]].buffer = len(m.buffers) - 1  # cell_state


HELD = 4 * UNITS * (SHAPE[2] + UNITS + 1)  # the op's weights and biases, each tensor counted once


@pytest.mark.parametrize(("change", "why", "held"), [
    (_option("fusedActivationFunction", 1), "with activation RELU: only TANH is checked", HELD),
    (_option("timeMajor", True), "with time_major=True", HELD),
    (_option("cellClip", 3.0), "with cell_clip=3 on 5 steps", HELD),
    (_peephole, "with peepholes", HELD),
    (_cifg, "without input gate weights (CIFG", HELD - UNITS * (SHAPE[2] + UNITS)),
    (_initial_state, "with a non-zero initial cell_state", HELD + SHAPE[0] * UNITS),
], ids=["relu", "time_major", "cell_clip", "peephole", "cifg", "initial_state"])
def test_an_lstm_the_preset_does_not_describe_stays_unchecked_saying_why(ec, change, why, held):
    a = adapter(_lstm_model(ec, change))
    (other,) = a.others
    assert other.kind == LSTM_OP and other.why.startswith(f"{LSTM_OP} {why}"), other.why
    assert other.weights == held


def test_a_cell_clip_that_cannot_bind_on_the_steps_run_is_checked(ec):
    a = adapter(_lstm_model(ec, _option("cellClip", 5.0)))  # |c_t| < t <= 5
    assert not a.others
    _, records = run(a, np.random.default_rng(4).standard_normal(SHAPE))
    assert [r.kind for r in records] == ["lstm"] and not a.others

"""Stacked recurrent layers (torch ``num_layers=N``) as N checked pairs, one per stacked layer (issue 21).

A torch ``nn.LSTM(num_layers=2)`` is captured as ``lstm[0]`` and ``lstm[1]``, each on its own input (layer 1's
is layer 0's output sequence), and pairs with two stacked Keras LSTMs, either way; a mistake in one layer is
named at that layer; every weight of the stack is counted once.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from ._support import seeded

T, F, H = 5, 4, 3


@pytest.fixture(scope="module")
def ec(torch, keras):
    import equivcheck

    return equivcheck


def _net(torch, *, cell="LSTM", layers=2, bidirectional=False, batch_first=True, dropout=0.0, seed=0):
    nn = torch.nn

    class Stacked(nn.Module):
        """A stacked recurrent layer (its whole output sequence) → Linear per step."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = getattr(nn, cell)(F, H, num_layers=layers, batch_first=batch_first,
                                          bidirectional=bidirectional, dropout=dropout)
            self.fc = nn.Linear(H * (2 if bidirectional else 1), 2)

        def forward(self, x):
            h = self.lstm(x if batch_first else x.transpose(0, 1))[0]
            return self.fc(h if batch_first else h.transpose(0, 1))

    return seeded(torch, Stacked, seed)


def _to_keras(net, keras, *, bidirectional=False, wrong_layer=None):
    """The torch stack as Keras LSTMs (``return_sequences=True``), one per torch layer, in ``Bidirectional`` where
    the torch layer is: torch gates i,f,g,o are Keras' i,f,c,o, kernels transposed, the two biases summed.
    ``wrong_layer``: that layer's gates reordered (i,o,f,c read as i,f,c,o)."""
    p = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    L = keras.layers
    inp = keras.Input((T, F))
    h, layers = inp, []
    for k in range(net.lstm.num_layers):
        layer = L.LSTM(H, return_sequences=True, name=f"lstm_{k}")
        layer = L.Bidirectional(layer, name=f"lstm_{k}") if bidirectional else layer
        h = layer(h)
        layers.append(layer)
    model = keras.Model(inp, L.Dense(2, name="fc")(h))

    def weights(k, suffix):
        order = (0, 2, 3, 1) if k == wrong_layer else (0, 1, 2, 3)

        def gates(a):
            return np.concatenate([a[g * H:(g + 1) * H] for g in order])

        return [gates(p[f"lstm.weight_ih_l{k}{suffix}"]).T, gates(p[f"lstm.weight_hh_l{k}{suffix}"]).T,
                gates(p[f"lstm.bias_ih_l{k}{suffix}"] + p[f"lstm.bias_hh_l{k}{suffix}"])]

    for k, layer in enumerate(layers):
        if bidirectional:
            layer.forward_layer.set_weights(weights(k, ""))
            layer.backward_layer.set_weights(weights(k, "_reverse"))
        else:
            layer.set_weights(weights(k, ""))
    model.get_layer("fc").set_weights([p["fc.weight"].T, p["fc.bias"]])
    return model


@pytest.mark.parametrize("bidirectional, batch_first", [(False, True), (True, False)])
def test_a_right_port_of_a_stacked_lstm_passes_layer_by_layer(ec, torch, keras, bidirectional, batch_first):
    net = _net(torch, bidirectional=bidirectional, batch_first=batch_first)
    result = ec.check_models(net, _to_keras(net, keras, bidirectional=bidirectional), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert result.unchecked == []
    assert [(r.source, r.converted, r.kind) for r in result.layers] == [
        ("lstm[0]", "lstm_0", "lstm"), ("lstm[1]", "lstm_1", "lstm"), ("fc", "fc", "dense")]
    first, second = result.layers[:2]
    assert first.comparison.passed and second.comparison.passed
    assert f"input_size={2 * H if bidirectional else H}" in second.notes[0]  # layer 1 reads layer 0's output
    assert "layer 1 of LSTM lstm (num_layers=2; weights *_l1" in " ".join(second.notes), second.notes
    assert ("*_l1_reverse" in " ".join(second.notes)) is bidirectional


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gates_reordered_in_the_second_layer_only_fail_naming_that_layer(ec, torch, keras, bidirectional):
    net = _net(torch, bidirectional=bidirectional)
    result = ec.check_models(net, _to_keras(net, keras, bidirectional=bidirectional, wrong_layer=1),
                             input_shape=(2, T, F))
    assert result.verdict == "fail", result.render()
    assert result.layers[0].verdict == "pass", result.render()
    first = result.first_divergence
    assert (first.source, first.converted, first.mistake) == ("lstm[1]", "lstm_1", "gate order"), result.render()
    assert first.diagnosis == "LSTM gate order: the kernel is i,f,g,o, the target reads i,o,f,c", first.diagnosis
    assert "w['weight_ih_l1']" in first.mapping and "_l0" not in first.mapping, first.mapping  # layer 1's own names
    assert ("weight_hh_l1_reverse" in first.mapping) is bidirectional
    assert "lstm[1]" in result.render() and "gate order" in result.reason


def _keras_stack(keras, *, last_step):
    L = keras.layers
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((T, F)), L.LSTM(H, return_sequences=True, name="k0"),
                              L.LSTM(H, return_sequences=not last_step, name="k1"), L.Dense(2, name="kfc")])
    for layer in model.layers[:2]:  # give the biases values to check (Keras starts them at 0 and 1)
        kernel, recurrent, bias = layer.get_weights()
        layer.set_weights([kernel, recurrent, np.random.default_rng(5).uniform(-0.5, 0.5, bias.shape)])
    return model


def _keras_to_torch(ec, torch, model, *, last_step, wrong_layer=None):
    """The Keras stack as one torch ``LSTM(num_layers=2)``, each layer converted by ``ec.convert`` (layer
    ``wrong_layer`` as if its kernel held the gates i,o,f,c)."""
    source, target = ec.spec("keras:lstm", input_size=F, units=H), ec.spec("torch:lstm", input_size=F, units=H)
    net = _net(torch, seed=1)
    with torch.no_grad():
        for k, layer in enumerate(model.layers[:2]):
            s = source.replace(input_size=F if k == 0 else H)
            kernel, recurrent, bias = layer.get_weights()
            read = s.replace(gate_order="iofg") if k == wrong_layer else s
            out = ec.convert(read, target.replace(input_size=F if k == 0 else H),
                             {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias})
            for name, value in out.items():
                getattr(net.lstm, name.replace("_l0", f"_l{k}")).copy_(torch.tensor(np.asarray(value, np.float32)))
        w, b = model.layers[2].get_weights()
        net.fc.weight.copy_(torch.tensor(w.T))
        net.fc.bias.copy_(torch.tensor(b))
    if last_step:
        net.forward = lambda x: net.fc(net.lstm(x)[0][:, -1])
    return net


@pytest.mark.parametrize("last_step", [False, True])
def test_two_stacked_keras_lstms_pair_with_a_torch_stack(ec, torch, keras, last_step):
    """Keras stacked → torch ``num_layers=2``: the Keras layers are the source, the torch layers' records the
    converted ones (the last Keras layer may return its last step only); a wrong layer 1 is named."""
    model = _keras_stack(keras, last_step=last_step)
    result = ec.check_models(model, _keras_to_torch(ec, torch, model, last_step=last_step), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted) for r in result.layers] == [("k0", "lstm[0]"), ("k1", "lstm[1]"), ("kfc", "fc")]
    assert not result.unchecked
    wrong = _keras_to_torch(ec, torch, model, last_step=last_step, wrong_layer=1)
    failed = ec.check_models(model, wrong, input_shape=(2, T, F))
    first = failed.first_divergence
    assert failed.verdict == "fail" and (first.source, first.converted) == ("k1", "lstm[1]"), failed.render()
    assert first.mistake == "gate order" and [r.verdict for r in failed.layers[:1]] == ["pass"], failed.render()
    assert "out['weight_ih_l1']" in first.mapping, first.mapping  # written to layer 1's torch names


@pytest.mark.parametrize("cell", ["GRU", "RNN"])
def test_stacked_gru_and_rnn_records_chain_exactly_to_the_real_layer(ec, torch, cell):
    """Each stacked layer's input is the previous one's output, its last output the module's own, bit for bit;
    the records' parameters add up to the module's; a copy of the model passes pair by pair."""
    from equivcheck.modelcheck.sides import adapter_for

    net = _net(torch, cell=cell, layers=3, batch_first=False)
    x = np.random.default_rng(0).standard_normal((2, T, F)).astype(np.float32)
    adapter = adapter_for(net, "source")
    _, records = adapter.run(x)
    stack = [r for r in records if r.config.get("module") == "lstm"]
    assert [r.name for r in stack] == ["lstm[0]", "lstm[1]", "lstm[2]"]
    assert all(r.kind == cell.lower() for r in stack)
    for before, after in itertools.pairwise(stack):
        assert np.array_equal(before.y, after.config["inputs"][0])
    with torch.no_grad():
        real = net.lstm(torch.from_numpy(x).transpose(0, 1))[0].transpose(0, 1).numpy()
    assert np.array_equal(stack[-1].y, real) and np.array_equal(stack[0].config["inputs"][0], x)
    assert sum(r.config["params"] for r in stack) == sum(p.numel() for p in net.lstm.parameters())
    assert not [o for o in adapter.others if o.name == "lstm"]
    result = ec.check_models(net, copy.deepcopy(net), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert [r.source for r in result.layers] == ["lstm[0]", "lstm[1]", "lstm[2]", "fc"]


def test_a_stack_with_dropout_in_training_mode_is_checked_in_eval_mode(ec, torch):
    """Dropout between stacked layers is random in training mode: the check runs the models in eval mode, where it
    is off, so the stack pairs layer by layer and says so."""
    net = _net(torch, dropout=0.5).train()
    result = ec.check_models(net, copy.deepcopy(net), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert [r.source for r in result.layers] == ["lstm[0]", "lstm[1]", "fc"]
    assert any("training mode: checked in eval mode" in n for n in result.notes), result.notes
    assert net.training  # its mode restored


def test_a_stack_run_in_training_mode_with_dropout_is_refused_saying_why(torch):
    """Outside a check (which runs in eval mode), a stack whose dropout is live is not captured: its layers' inputs
    are random."""
    from equivcheck.modelcheck.sequence_capture import torch_sequence_records

    lstm = torch.nn.LSTM(F, H, num_layers=2, dropout=0.5, batch_first=True)
    x = torch.zeros(2, T, F)
    with torch.no_grad():
        why = torch_sequence_records(lstm, "lstm", (x,), {}, lstm(x), 0)
        assert why == ("LSTM num_layers=2 with dropout=0.5 in training mode: the dropout between its stacked layers "
                       "is random (checked in eval mode)")
        found = torch_sequence_records(lstm.eval(), "lstm", (x,), {}, lstm(x), 4)
    assert [(r.name, r.index, r.config["stacked"]) for r in found] == [("lstm[0]", 4, (0, 2)), ("lstm[1]", 5, (1, 2))]
    assert found[1].config["names"]["weight_ih_l0"] == "weight_ih_l1"

"""Recurrent and attention layers as checked pairs: a torch LSTM and MultiheadAttention ported to Keras 3 by hand."""

from __future__ import annotations

import numpy as np
import pytest

T, F, E, HEADS = 5, 4, 8, 2


@pytest.fixture(scope="module")
def ec(torch, keras):
    import equivcheck

    return equivcheck


@pytest.fixture(scope="module")
def net(torch):
    nn = torch.nn

    class SeqNet(nn.Module):
        """Linear → LSTM (batch first) → self-attention (time first) → Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(F, E)
            self.lstm = nn.LSTM(E, E, batch_first=True)
            self.attn = nn.MultiheadAttention(E, HEADS)
            self.out = nn.Linear(E, 3)

        def forward(self, x):
            h, _ = self.lstm(torch.tanh(self.inp(x)))
            t = h.transpose(0, 1)
            a, _ = self.attn(t, t, t, need_weights=False)
            return self.out(a.transpose(0, 1))

    torch.manual_seed(0)
    model = SeqNet().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)  # torch starts attention biases at zero: give every bias a value to check
    return model


def _port(net, keras, *, gates=(0, 1, 2, 3), qkv=(0, 1, 2)):
    """The torch model in Keras, converted by hand: torch LSTM gates i,f,g,o are Keras' i,f,c,o (``gates`` picks
    the torch blocks for Keras' slots), kernels transposed, the two biases summed; in_proj_weight split into
    q, k, v (``qkv`` picks the torch block for each) as (E, heads, head_dim) kernels, out_proj as (heads, head_dim, E)."""
    p = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    L = keras.layers
    inp = keras.Input((T, F))
    h = L.Dense(E, activation="tanh", name="inp")(inp)
    h = L.LSTM(E, return_sequences=True, name="lstm")(h)
    a = L.MultiHeadAttention(HEADS, E // HEADS, name="attn")(h, h)
    model = keras.Model(inp, L.Dense(3, name="out")(a))

    def blocks(w, n, order):
        size = len(w) // n
        return np.concatenate([w[g * size:(g + 1) * size] for g in order])

    model.get_layer("inp").set_weights([p["inp.weight"].T, p["inp.bias"]])
    model.get_layer("lstm").set_weights([blocks(p["lstm.weight_ih_l0"], 4, gates).T,
                                         blocks(p["lstm.weight_hh_l0"], 4, gates).T,
                                         blocks(p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"], 4, gates)])
    w, b = p["attn.in_proj_weight"], p["attn.in_proj_bias"]
    d = E // HEADS
    parts = []
    for i in qkv:  # query, key, value
        parts += [w[i * E:(i + 1) * E].T.reshape(E, HEADS, d), b[i * E:(i + 1) * E].reshape(HEADS, d)]
    parts += [p["attn.out_proj.weight"].T.reshape(HEADS, d, E), p["attn.out_proj.bias"]]
    model.get_layer("attn").set_weights(parts)
    model.get_layer("out").set_weights([p["out.weight"].T, p["out.bias"]])
    return model


def test_a_right_port_passes_with_every_parameter_checked(ec, net, keras):
    result = ec.check_models(net, _port(net, keras), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert result.unchecked == []
    rows = {r.source: r for r in result.layers}
    assert [(r.source, r.converted, r.kind) for r in result.layers] == [
        ("inp", "inp", "dense"), ("lstm", "lstm", "lstm"), ("attn", "attn", "mha"), ("out", "out", "dense")]
    assert rows["lstm"].comparison.passed and rows["attn"].comparison.passed
    assert "lstm" in result.render() and "mha" in result.render()


def test_gates_reordered_fail_naming_the_lstm_and_the_gate_order(ec, net, keras):
    result = ec.check_models(net, _port(net, keras, gates=(0, 2, 3, 1)), input_shape=(2, T, F))
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert (first.source, first.converted, first.mistake) == ("lstm", "lstm", "gate order"), result.render()
    assert first.diagnosis == "LSTM gate order: the kernel is i,f,g,o, the target reads i,o,f,c", first.diagnosis
    assert "kernel" in first.mapping and "weight_ih_l0" in first.mapping  # the right conversion, re-run before offered


def test_q_and_k_exchanged_fail_naming_the_attention_layer(ec, net, keras):
    result = ec.check_models(net, _port(net, keras, qkv=(1, 0, 2)), input_shape=(2, T, F))
    assert result.verdict == "fail", result.render()
    first = result.first_divergence
    assert (first.source, first.converted, first.mistake) == ("attn", "attn", "q/k/v order"), result.render()
    assert "q,k,v stored, the target reads k,q,v" in first.diagnosis
    assert [r.verdict for r in result.layers[:2]] == ["pass", "pass"]


def test_torch_to_torch_pairs_and_unsupported_layers_stay_unchecked_by_name(ec, net, torch):
    import copy

    assert ec.check_models(net, copy.deepcopy(net), input_shape=(2, T, F)).verdict == "pass"
    nn = torch.nn

    class Bi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(F, 3, batch_first=True, bidirectional=True)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            h, _ = self.lstm(x)
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            return self.fc(self.attn(h, h, h, attn_mask=mask)[0])

    bi = Bi().eval()
    result = ec.check_models(bi, copy.deepcopy(bi), input_shape=(2, T, F))
    assert result.verdict == "inconclusive", result.render()
    found = {(u.model, u.name, u.kind): u.why for u in result.unchecked}
    assert set(found) == {(m, n, k) for m in ("source", "converted") for n, k in (("lstm", "LSTM"), ("attn", "MultiheadAttention"))}
    assert "bidirectional" in found["source", "lstm", "LSTM"] and "mask" in found["source", "attn", "MultiheadAttention"]
    assert result.unchecked[0].weights == sum(p.numel() for p in bi.lstm.parameters())


@pytest.mark.parametrize("cell", ["GRU", "RNN"])
def test_gru_and_simple_rnn_time_first_pair_and_a_gru_gate_order_is_named(ec, torch, keras, cell):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(nn, cell)(F, 5)  # (time, batch, features)
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.rnn(x.transpose(0, 1))[0].transpose(0, 1))

    torch.manual_seed(1)
    net = Net().eval()
    p = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    wi, wh, bi, bh = (p[f"rnn.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def port(order):  # torch GRU gates r,z,n; Keras z,r,h (reset after the recurrent matmul, two biases)
        inp = keras.Input((T, F))
        layer = keras.layers.GRU(5, return_sequences=True, name="rnn") if cell == "GRU" else \
            keras.layers.SimpleRNN(5, return_sequences=True, name="rnn")
        model = keras.Model(inp, keras.layers.Dense(2, name="fc")(layer(inp)))
        if cell == "GRU":
            def blk(a):
                return np.concatenate([a[g * 5:(g + 1) * 5] for g in order])

            layer.set_weights([blk(wi).T, blk(wh).T, np.stack([blk(bi), blk(bh)])])
        else:
            layer.set_weights([wi.T, wh.T, bi + bh])
        model.get_layer("fc").set_weights([p["fc.weight"].T, p["fc.bias"]])
        return model

    result = ec.check_models(net, port((1, 0, 2)), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.kind) for r in result.layers] == [("rnn", cell.lower()), ("fc", "dense")]
    if cell == "GRU":
        first = ec.check_models(net, port((0, 1, 2)), input_shape=(2, T, F)).first_divergence
        assert (first.source, first.mistake) == ("rnn", "gate order"), first.diagnosis
        assert first.diagnosis.startswith("GRU gate order: the kernel is r,z,n"), first.diagnosis

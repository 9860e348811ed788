"""Recurrent and attention layers as checked pairs: a torch LSTM and MultiheadAttention ported to Keras 3 by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ._support import seeded

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

    return seeded(torch, SeqNet, 0)


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
            self.lstm = nn.LSTM(F, 3, batch_first=True, proj_size=2)  # a projection: no spec describes it
            self.attn = nn.MultiheadAttention(2, 1, batch_first=True)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            h, _ = self.lstm(x)
            bias = torch.linspace(-1, 0, T * T).reshape(T, T)  # a float mask adding finite values: a bias on the scores
            return self.fc(self.attn(h, h, h, attn_mask=bias)[0])

    bi = Bi().eval()
    result = ec.check_models(bi, copy.deepcopy(bi), input_shape=(2, T, F))
    assert result.verdict == "inconclusive", result.render()
    found = {(u.model, u.name, u.kind): u.why for u in result.unchecked}
    assert set(found) == {(m, "lstm", "LSTM") for m in ("source", "converted")}
    assert "proj_size=2" in found["source", "lstm", "LSTM"]
    assert result.unchecked[0].weights == sum(p.numel() for p in bi.lstm.parameters())
    attn = next(r for r in result.layers if r.source == "attn")
    assert attn.verdict == "inconclusive" and "mask not captured" in " ".join(attn.notes), attn.notes


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



@pytest.fixture(scope="module")
def binet(torch):
    nn = torch.nn

    class BiNet(nn.Module):
        """A bidirectional LSTM (batch first) → causal self-attention with a key padding mask (from the data: a key
        whose first feature is above 0.5 is padding, the first step never) → Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(F, 3, batch_first=True, bidirectional=True)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            h, _ = self.lstm(x)
            pad = x[:, :, 0] > 0.5
            pad[:, 0] = False
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            return self.fc(self.attn(h, h, h, key_padding_mask=pad, attn_mask=causal, is_causal=True,
                                     need_weights=False)[0])

    return seeded(torch, BiNet, 3)


def _bi_port(net, keras, *, swap=False, invert=False):
    """BiNet in Keras: ``Bidirectional(LSTM)`` (``swap``: the directions exchanged), attention with
    ``use_causal_mask`` and an ``attention_mask`` of the keys that may be attended (``invert``: torch's polarity
    kept, True meaning padding)."""
    p = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    L, ops = keras.layers, keras.ops
    inp = keras.Input((T, F))
    bi = L.Bidirectional(L.LSTM(3, return_sequences=True), name="lstm")
    h = bi(inp)
    first = np.arange(T) == 0

    def keys(x):
        pad = ops.logical_and(x[:, :, 0] > 0.5, ops.convert_to_tensor(~first))
        return (pad if invert else ops.logical_not(pad))[:, None, :]

    mask = L.Lambda(keys, name="keys")(inp)
    a = L.MultiHeadAttention(2, 3, name="attn")(h, h, attention_mask=mask, use_causal_mask=True)
    model = keras.Model(inp, L.Dense(2, name="fc")(a))

    def lstm(s):  # torch i,f,g,o is Keras i,f,c,o: kernels transposed, the two biases summed
        return [p[f"lstm.weight_ih_l0{s}"].T, p[f"lstm.weight_hh_l0{s}"].T, p[f"lstm.bias_ih_l0{s}"] + p[f"lstm.bias_hh_l0{s}"]]

    fw, bw = lstm(""), lstm("_reverse")
    bi.forward_layer.set_weights(bw if swap else fw)
    bi.backward_layer.set_weights(fw if swap else bw)
    w, b = p["attn.in_proj_weight"], p["attn.in_proj_bias"]
    parts = []
    for i in range(3):
        parts += [w[i * 6:(i + 1) * 6].T.reshape(6, 2, 3), b[i * 6:(i + 1) * 6].reshape(2, 3)]
    model.get_layer("attn").set_weights([*parts, p["attn.out_proj.weight"].T.reshape(2, 3, 6), p["attn.out_proj.bias"]])
    model.get_layer("fc").set_weights([p["fc.weight"].T, p["fc.bias"]])
    return model


def test_bidirectional_lstm_and_masked_attention_are_checked_pairs(ec, binet, keras):
    result = ec.check_models(binet, _bi_port(binet, keras), input_shape=(2, T, F))
    assert result.verdict == "pass", result.render()
    assert result.unchecked == []
    assert [(r.source, r.converted, r.kind) for r in result.layers] == [
        ("lstm", "lstm", "lstm"), ("attn", "attn", "mha"), ("fc", "fc", "dense")]
    attn = result.layers[1]
    assert any(n.startswith("masked: ") for n in attn.notes) and "bidirectional" in result.layers[0].notes[0]


def test_bidirectional_directions_exchanged_and_an_inverted_mask_are_named(ec, binet, keras):
    first = ec.check_models(binet, _bi_port(binet, keras, swap=True), input_shape=(2, T, F)).first_divergence
    assert (first.source, first.mistake) == ("lstm", "direction order"), first.diagnosis
    result = ec.check_models(binet, _bi_port(binet, keras, invert=True), input_shape=(2, T, F))
    assert result.verdict == "fail"
    first = result.first_divergence
    assert (first.source, first.mistake) == ("attn", "attention mask"), result.render()
    assert "inverted" in first.diagnosis, first.diagnosis


def test_a_keras_lstm_returning_its_last_step_pairs_with_torch_both_ways(ec, torch, keras):
    """Keras ``LSTM(units)`` (return_sequences=False) ↔ torch ``lstm(x)[0][:, -1]``: a checked pair, the input
    read as (batch, time, features) on both sides, a gate-order mistake named."""
    k = keras.Sequential([keras.Input((T, F)), keras.layers.LSTM(3), keras.layers.Dense(2)])
    kernel, recurrent, bias = k.layers[0].get_weights()
    source, target = ec.spec("keras:lstm", input_size=F, units=3), ec.spec("torch:lstm", input_size=F, units=3)

    class Net(torch.nn.Module):
        def __init__(self, weights) -> None:
            super().__init__()
            self.lstm, self.fc = torch.nn.LSTM(F, 3, batch_first=True), torch.nn.Linear(3, 2)
            with torch.no_grad():
                for name, value in weights.items():
                    getattr(self.lstm, name).copy_(torch.tensor(np.asarray(value, np.float32)))
                self.fc.weight.copy_(torch.tensor(k.layers[1].get_weights()[0].T))
                self.fc.bias.copy_(torch.tensor(k.layers[1].get_weights()[1]))

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    weights = {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias}
    right = Net(ec.convert(source, target, weights)).eval()
    for a, b in ((k, right), (right, k)):
        result = ec.check_models(a, b, input_shape=(2, T, F))
        assert result.verdict == "pass", result.render()
        assert [r.kind for r in result.layers] == ["lstm", "dense"] and not result.unchecked
    wrong = Net(ec.convert(source.replace(gate_order="iofg"), target, weights)).eval()
    failed = ec.check_models(k, wrong, input_shape=(2, T, F))
    assert failed.verdict == "fail" and failed.first_divergence.source == k.layers[0].name, failed.render()
    assert "gate order" in failed.first_divergence.diagnosis


def test_a_pair_is_judged_against_the_float64_reference_under_the_converted_layers_own_bound(ec, net, keras):
    """Issue 25: the converted layer replayed on the source's captured input is judged against the exact output of
    the *source's* spec and weights (not the source's captured output) under its own bound, as verify_pair does."""
    from equivcheck.modelcheck.sequence_pairs import _replay, check_sequence_pair
    from equivcheck.modelcheck.sides import adapter_for
    from equivcheck.sequence.verify import judgement_bounds

    x = np.random.default_rng(0).standard_normal((2, T, F)).astype(np.float32)
    s = next(r for r in adapter_for(net, "source").run(x)[1] if r.name == "lstm")
    c = next(r for r in adapter_for(_port(net, keras), "converted").run(x, outputs=False)[1] if r.name == "lstm")
    row = check_sequence_pair(s, c, "float32", False, False)
    assert row.verdict == "pass", row.notes
    ss, cs = s.config["sequence"], c.config["sequence"]
    ws = {k: np.asarray(v, np.float64) for k, v in s.config["named"].items()}
    xs = np.asarray(s.config["inputs"][0], np.float64)
    exact, bound, bound_c = judgement_bounds(ss, cs, ws, xs, "float32")
    y_c, _ = _replay(cs, {k: np.asarray(v, np.float64) for k, v in c.config["named"].items()}, xs, "float32")
    worst = row.comparison.worst_index
    assert row.comparison.bound_at_worst == bound_c[worst] != 2 * bound[worst]
    assert np.all(bound_c >= bound)  # the converted layer's bound is never below the source's
    assert row.comparison.max_abs_error == pytest.approx(float(np.abs(y_c - exact).max()), rel=1e-12)


def test_mutants_are_judged_as_verify_pair_judges_them(ec):
    """judge_mutants (the model check's mutants) gives verify_pair's very ratios on verify_pair's data: a mutant is
    rejected beyond its own bound plus the target's."""
    from equivcheck.sequence.verify import draw, judge_mutants, verify_sequence_pair

    source, target = ec.spec("torch:lstm", input_size=F, units=3), ec.spec("keras:lstm", input_size=F, units=3)
    case = verify_sequence_pair(source, target, dtype="float32", seed=0)
    weights, inputs = draw(source, seed=0, batch=2, steps=5)
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    outcomes = judge_mutants(source, target, weights, inputs.astype(np.float32), "float32")
    assert [o.name for o in outcomes] == [m.name for m in case.mutations] and len(outcomes) >= 5
    assert [o.max_error_ratio for o in outcomes] == pytest.approx([m.max_error_ratio for m in case.mutations], rel=1e-9)
    assert all(o.outcome == "rejected" for o in outcomes)

"""Every preset pair converts and verifies on the real layers; every mutant is rejected and named."""

import itertools
import json

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import identify, mutants, spec, verify_sequence_pair
from equivcheck.sequence import verify as verify_module

pytest.importorskip("torch")
pytest.importorskip("keras")
pytest.importorskip("onnxruntime")

KW = dict(input_size=5, units=6)
GROUPS = {
    "lstm": [("torch:lstm", {}), ("keras:lstm", {}), ("onnx:lstm", {}), ("flax:lstm", {})],
    "gru-after": [("torch:gru", {}), ("keras:gru", {}), ("onnx:gru", {"linear_before_reset": True})],
    "gru-before": [("keras:gru", {"reset_after": False}), ("onnx:gru", {})],
    "rnn": [("torch:rnn", {}), ("keras:rnn", {}), ("onnx:rnn", {})],
}


def _pairs(bidirectional):
    for name, group in GROUPS.items():
        if bidirectional and name == "rnn":  # the direction handling is the LSTM's and GRU's: keep the suite short
            continue
        specs = [spec(n, bidirectional=bidirectional, **KW, **kw) for n, kw in group
                 if not (bidirectional and n.startswith("flax"))]
        yield from itertools.permutations(specs, 2)


def _backends(a, b):
    """Flax layers (pinned on real Flax in test_layers.py) run on the reference here: jax compiles each run."""
    return {"source_backend": "numpy" if a.storage == "flax" else None,
            "target_backend": "numpy" if b.storage == "flax" else None}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_every_recurrent_preset_pair_verifies_in_float32(bidirectional):
    results = [verify_sequence_pair(a, b, dtype="float32", **_backends(a, b)) for a, b in _pairs(bidirectional)]
    bad = [(r.source.name, r.target.name, r.message) for r in results if r.verdict != "pass"]
    assert not bad
    assert [(r.source.name, r.target.name) for r in results if not r.rejected == len(r.mutants) >= 3 or r.max_error > r.bound] == []


def test_every_attention_preset_pair_verifies_in_float32():
    specs = [spec(f"{n}:mha", embed_dim=8, heads=2) for n in ("torch", "keras", "flax", "gpt2", "neox")]
    for a, b in itertools.permutations(specs, 2):
        r = verify_sequence_pair(a, b, dtype="float32", **_backends(a, b))
        assert r.verdict == "pass", r.message
        assert r.rejected == len(r.mutants) == 9


CASES = [
    (spec("torch:lstm", input_size=6, units=6, bidirectional=True), spec("keras:lstm", input_size=6, units=6, bidirectional=True)),
    (spec("torch:lstm", input_size=6, units=6), spec("onnx:lstm", input_size=6, units=6)),
    (spec("keras:gru", input_size=6, units=6), spec("torch:gru", input_size=6, units=6)),
    (spec("torch:gru", **KW), spec("onnx:gru", linear_before_reset=True, **KW)),
    (spec("torch:mha", embed_dim=8, heads=2), spec("keras:mha", embed_dim=8, heads=2)),
]


@pytest.mark.parametrize(("source", "target"), CASES, ids=lambda s: s.name)
def test_each_mutant_is_rejected_and_named(source, target):
    weights, _ = verify_module.draw(source)
    found = mutants(source, target, weights)
    assert len({m.name for m in found}) == len(found) >= 5
    result = verify_sequence_pair(source, target)
    assert result.verdict == "pass" and {row[0] for row in result.mutants} == {m.name for m in found}
    assert all(rejected for *_, rejected in result.mutants), result.mutants
    named = [m for m in found if m.spec == target]
    for m in named:
        assert identify(source, target, weights, m.weights) == m.description
    m = named[0]  # the whole path once: a converter making this mistake fails, and the message names it
    failed = verify_sequence_pair(source, target, converter=lambda w: next(
        x for x in mutants(source, target, w) if x.name == m.name).weights)
    assert failed.verdict == "fail" and m.description in failed.message
    names = {m.name for m in found}
    if source.kind == "recurrent":
        assert {"bias_summed_twice", "kernel_not_transposed", "recurrent_not_transposed", "kernels_exchanged"} <= names or (
            source.input_size != source.units)
        assert any(n.startswith("gate_order:") for n in names)
    else:
        assert {"heads_head_dim_exchanged", "interleaved_as_stacked", "qkv_order:k,q,v"} <= names


def test_identify_says_which_gate_order():
    src, dst = spec("torch:lstm", **KW), spec("onnx:lstm", **KW)
    weights, _ = verify_module.draw(src)
    copied = ec.convert(src.replace(gate_order="iofg"), dst, weights)  # blocks copied in place
    assert identify(src, dst, weights, copied) == "LSTM gate order: the kernel is i,f,g,o, the target reads i,o,f,c"
    assert identify(src, dst, weights, ec.convert(src, dst, weights)) == "correct"
    noise = {k: v + 0.1 for k, v in ec.convert(src, dst, weights).items()}
    assert identify(src, dst, weights, noise).startswith("not a known conversion")


def test_reset_placement_is_rejected():
    r = verify_sequence_pair(spec("torch:gru", **KW), spec("keras:gru", **KW))
    record = json.loads(json.dumps(r.to_dict()))
    assert record["verdict"] == "pass" and len(record["mutants"]) == len(r.mutants)
    row = next(row for row in r.mutants if row[0] == "reset_placement")
    assert row[1] == "GRU reset gate applied before the recurrent matmul" and row[3]


def test_inconclusive_when_a_mutant_would_pass(monkeypatch):
    monkeypatch.setattr(verify_module, "MARGIN", 1e12)
    r = verify_sequence_pair(spec("torch:rnn", **KW), spec("keras:rnn", **KW))
    assert r.verdict == "inconclusive" and "would pass on the drawn data too" in r.message


def test_a_torch_converter_and_float64():
    torch = pytest.importorskip("torch")
    src, dst = spec("keras:lstm", **KW), spec("torch:lstm", **KW)

    def converter(w):
        kernel, recurrent, bias = (torch.from_numpy(w[k]) for k in ("kernel", "recurrent_kernel", "bias"))
        return {"weight_ih_l0": kernel.T, "weight_hh_l0": recurrent.T, "bias_ih_l0": bias, "bias_hh_l0": torch.zeros_like(bias)}

    r = verify_sequence_pair(src, dst, converter=converter, dtype="float64")
    assert r.verdict == "pass" and r.bound < 1e-9


def test_short_sequences_are_refused():
    with pytest.raises(ec.SpecError, match=r"^steps=2 is too short"):
        verify_sequence_pair(spec("torch:lstm", **KW), spec("keras:lstm", **KW), steps=2)


def test_the_drawn_gates_do_not_saturate():
    s = spec("torch:lstm", input_size=32, units=64)
    weights, x = verify_module.draw(s)
    w, b = weights["weight_ih_l0"], weights["bias_ih_l0"] + weights["bias_hh_l0"]
    pre = np.einsum("gi,bti->btg", w, x) + b
    assert np.mean(np.abs(pre) > 3) < 0.01


@pytest.mark.parametrize(("source", "target"), [
    (spec("torch:lstm", **KW), spec("onnx:lstm", **KW)),
    (spec("torch:gru", **KW), spec("torch:gru", **KW)),
    (spec("torch:mha", embed_dim=8, heads=2), spec("gpt2:mha", embed_dim=8, heads=2)),
], ids=["lstm", "gru", "mha"])
def test_single_swaps_are_caught(source, target):
    """Two distinct entries of one converted tensor exchanged: at least 95 % of them fail."""
    rng = np.random.default_rng(7)
    caught = 0
    for _ in range(20):
        def swapped(w):
            out = ec.convert(source, target, w)
            name = sorted(out)[rng.integers(len(out))]
            flat = out[name].reshape(-1).copy()
            a, b = rng.choice(flat.size, 2, replace=False)
            flat[[a, b]] = flat[[b, a]]
            return {**out, name: flat.reshape(out[name].shape)}

        caught += verify_sequence_pair(source, target, converter=swapped).verdict == "fail"
    assert caught >= 19


def test_a_swap_hidden_in_the_bfloat16_rounding_shows_on_the_grid_draws(monkeypatch):
    """Two recurrent weights 7 % apart (0.347, 0.372) swapped: within the rounding bound on the normal draw, caught
    on a grid draw, where the same two entries hold 0 and -1."""
    s = spec("torch:lstm", **KW)

    def swapped(w):
        out = {k: np.array(v, copy=True) for k, v in w.items()}
        flat = out["weight_hh_l0"].reshape(-1)
        flat[[126, 134]] = flat[[134, 126]]
        return out

    assert verify_module.draw_grid(s, seed=5)[0]["weight_hh_l0"].ravel()[[126, 134]].tolist() == [0.0, -1.0]
    r = verify_sequence_pair(s, s, dtype="bfloat16", converter=swapped, seed=4, mutants=False)
    assert r.verdict == "fail" and "on grid draw 2 (draw_grid seed=5)" in r.reason, r.reason
    monkeypatch.setattr(verify_module, "GRID_DRAWS", 0)
    assert verify_sequence_pair(s, s, dtype="bfloat16", converter=swapped, seed=4, mutants=False).verdict == "pass"


def test_grid_draws_are_exact_in_low_precision_and_well_apart():
    s = spec("keras:gru", **KW)
    weights, x = verify_module.draw_grid(s, seed=3)
    for w in weights.values():
        assert np.array_equal(w.astype(np.float16), w) and np.mean(w == 0) > 0.25
        gaps = np.diff(np.unique(np.abs(w[w != 0])))
        assert np.all(gaps >= np.abs(w[w != 0]).min())  # distinct magnitudes differ by at least the smallest one
    assert x.shape == (verify_module.GRID_BATCH, 5, 5)

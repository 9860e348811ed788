"""Plans over named tensors: per-tensor mappings, code, composition, inversion, array kinds."""

import itertools

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import canonical, spec, tensor_shapes
from equivcheck.sequence.named import Spread, Sum, Take

KW = dict(input_size=3, units=5)
RECURRENT = [("torch:lstm", {}), ("keras:lstm", {}), ("onnx:lstm", {}), ("flax:lstm", {}),
             ("torch:gru", {}), ("keras:gru", {}), ("onnx:gru", {"linear_before_reset": True}),
             ("keras:gru", {"reset_after": False}), ("onnx:gru", {}), ("torch:rnn", {}), ("keras:rnn", {}), ("onnx:rnn", {})]


def _weights(s, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) for k, shape in tensor_shapes(s).items()}


def _pairs(bidirectional):
    specs = [spec(n, bidirectional=bidirectional, **KW, **kw) for n, kw in RECURRENT
             if not (bidirectional and n.startswith("flax"))]
    return [(a, b) for a, b in itertools.product(specs, repeat=2)
            if a.cell == b.cell and a.reset_after == b.reset_after]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_every_recurrent_pair_keeps_the_canonical_weights(bidirectional):
    for a, b in _pairs(bidirectional):
        w = _weights(a)
        out = ec.convert(a, b, w)
        assert {k: v.shape for k, v in out.items()} == tensor_shapes(b)
        ca, cb = canonical(a).apply(w), canonical(b).apply(out)
        for k in ca:
            if k.startswith("b"):  # a bias may be summed: the sum is what the layer sees
                np.testing.assert_allclose(ca[k].sum(0), cb[k].sum(0), err_msg=f"{a.name} -> {b.name} {k}")
            else:
                np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"{a.name} -> {b.name} {k}")


def test_every_attention_pair_keeps_the_canonical_weights():
    specs = [spec(f"{n}:mha", embed_dim=8, heads=2) for n in ("torch", "keras", "flax")]
    for a, b in itertools.product(specs, repeat=2):
        w = _weights(a)
        ca, cb = canonical(a).apply(w), canonical(b).apply(ec.convert(a, b, w))
        assert all(np.array_equal(ca[k], cb[k]) for k in ca)


@pytest.mark.parametrize(("src", "dst", "code"), [
    ("torch:lstm", "keras:lstm", "out['kernel'] = w['weight_ih_l0'].T\nout['recurrent_kernel'] = w['weight_hh_l0'].T\n"
     "out['bias'] = np.stack([w['bias_ih_l0'], w['bias_hh_l0']]).sum(0)"),
    ("torch:lstm", "onnx:lstm", "out['W'] = w['weight_ih_l0'].reshape(4, 5, 3)[[0, 3, 1, 2]].reshape(1, 20, 3)"),
    ("keras:lstm", "torch:lstm", "out['bias_ih_l0'] = w['bias']"),
])
def test_code(src, dst, code):
    assert code in ec.plan(spec(src, **KW), spec(dst, **KW)).code()


@pytest.mark.parametrize("lang", ["numpy", "torch", "einops"])
def test_rendered_code_runs_and_agrees(lang):
    torch = pytest.importorskip("torch") if lang == "torch" else None
    einops = pytest.importorskip("einops") if lang == "einops" else None
    cases = [("torch:lstm", "onnx:lstm", dict(bidirectional=True, **KW)), ("keras:lstm", "torch:lstm", KW),
             ("keras:gru", "onnx:gru", dict(linear_before_reset=True, **KW)), ("onnx:lstm", "flax:lstm", KW),
             ("torch:mha", "keras:mha", dict(embed_dim=8, heads=2)), ("keras:mha", "torch:mha", dict(embed_dim=8, heads=2))]
    for src, dst, kw in cases:
        kw_dst = {k: v for k, v in kw.items() if k != "linear_before_reset"}
        if dst == "onnx:gru":
            kw_dst["linear_before_reset"] = True
        a, b = spec(src, **{k: v for k, v in kw.items() if k != "linear_before_reset"}), spec(dst, **kw_dst)
        p = ec.plan(a, b)
        w = _weights(a)
        scope = {"np": np, "w": w, "out": {}}
        if torch is not None:
            scope.update(torch=torch, w={k: torch.from_numpy(v) for k, v in w.items()})
        if einops is not None:
            scope["rearrange"] = einops.rearrange
        exec(p.code(lang), scope)  # our own generated code
        want = p.apply(w)
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(scope["out"][k]), v, err_msg=f"{src} -> {dst} {k} ({lang})")


def test_torch_tensors_keep_their_kind():
    torch = pytest.importorskip("torch")
    a, b = spec("torch:gru", bidirectional=True, **KW), spec("keras:gru", bidirectional=True, **KW)
    out = ec.convert(a, b, {k: torch.from_numpy(v) for k, v in _weights(a).items()})
    assert all(isinstance(v, torch.Tensor) for v in out.values())


def test_composition_and_inverse():
    t, k, o = (spec(n, bidirectional=True, **KW) for n in ("torch:lstm", "keras:lstm", "onnx:lstm"))
    w = _weights(t)
    direct = ec.plan(t, o).apply(w)
    via = ec.plan(t, k).then(ec.plan(k, o)).apply(w)
    for name in direct:  # through Keras the biases are summed: all of it lands in the input half
        if name != "B":
            np.testing.assert_array_equal(direct[name], via[name])
    back = ec.plan(t, k).inverse()
    assert back.source == k and back.target == t
    round_trip = back.apply(ec.convert(t, k, w))
    np.testing.assert_array_equal(round_trip["weight_ih_l0_reverse"], w["weight_ih_l0_reverse"])
    np.testing.assert_allclose(round_trip["bias_ih_l0"], w["bias_ih_l0"] + w["bias_hh_l0"])
    np.testing.assert_array_equal(round_trip["bias_hh_l0"], 0 * w["bias_hh_l0"])


def test_the_new_ops_are_steps_of_the_plans():
    steps = ec.plan(spec("torch:lstm", **KW), spec("onnx:lstm", **KW))["W"].steps
    assert any(isinstance(s, Take) and s.indices == (0, 3, 1, 2) for s in steps)
    assert any(isinstance(s, Sum) for s in ec.plan(spec("torch:lstm", **KW), spec("keras:lstm", **KW))["bias"].steps)
    assert any(isinstance(s, Spread) for s in canonical(spec("keras:lstm", **KW))["b0"].steps)


def test_wrong_weights_are_refused():
    a, b = spec("torch:lstm", **KW), spec("keras:lstm", **KW)
    w = _weights(a)
    with pytest.raises(ec.SpecError, match=r"weights lack 'bias_hh_l0'"):
        ec.convert(a, b, {k: v for k, v in w.items() if k != "bias_hh_l0"})
    with pytest.raises(ec.SpecError, match=r"^weight_ih_l0 shape=\(3, 20\) is not the expected \(20, 3\)$"):
        ec.convert(a, b, {**w, "weight_ih_l0": w["weight_ih_l0"].T})

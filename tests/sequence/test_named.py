"""Plans over named tensors: per-tensor mappings, code, composition, inversion, array kinds."""

import itertools

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import canonical, spec, tensor_shapes
from equivcheck.sequence.named import ConcatPlan, Spread, Sum, Take

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


GROUPED = ("keras:mha", "llama:mha", "internlm2:mha")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_every_grouped_attention_pair_keeps_the_canonical_weights(kv_heads):
    names = GROUPED + (("torch:mha", "flax:mha", "gpt2:mha", "neox:mha") if kv_heads == 4 else ())
    specs = [spec(n, embed_dim=8, heads=4, kv_heads=kv_heads) for n in names]
    for a, b in itertools.product(specs, repeat=2):
        w = _weights(a)
        out = ec.convert(a, b, w)
        assert {k: v.shape for k, v in out.items()} == tensor_shapes(b)
        ca, cb = canonical(a).apply(w), canonical(b).apply(out)
        assert set(ca) == set(cb) == ({"Win", "bin", "Wo", "bo"} if kv_heads == 4 else {"Wq", "Wkv", "bq", "bkv", "Wo", "bo"})
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"{a.name} -> {b.name} {k}")
        back = ec.convert(b, a, out)  # and back: the very weights
        assert all(np.array_equal(back[k], w[k]) for k in w), f"{a.name} -> {b.name} -> {a.name}"


def test_the_per_kv_group_layout():
    """InternLM2's wqkv rows: per key-value group its query heads, then its key head, then its value head."""
    N, K, Dh, E = 4, 2, 3, 5
    llama, intern = (spec(n, embed_dim=E, heads=N, head_dim=Dh, kv_heads=K) for n in ("llama:mha", "internlm2:mha"))
    w = _weights(llama)
    q, k, v = (w[f"{p}_proj.weight"].reshape(-1, Dh, E) for p in "qkv")
    rows = [r for g in range(K) for r in (*q[g * 2:(g + 1) * 2], k[g], v[g])]
    p = ec.plan(llama, intern)
    np.testing.assert_array_equal(p.apply(w)["wqkv.weight"], np.concatenate(rows))
    assert isinstance(p["wqkv.weight"], ConcatPlan) and p["wqkv.weight"].sources == ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    assert ec.plan(intern, intern)["wqkv.weight"].code() == "w['wqkv.weight']"  # a join of its own slices: itself
    back = p.inverse().apply(p.apply(w))
    assert all(np.array_equal(back[n], w[n]) for n in w)
    keras_ = spec("keras:mha", embed_dim=E, heads=N, head_dim=Dh, kv_heads=K)
    assert p.then(ec.plan(intern, keras_)).code() == ec.plan(llama, keras_).code()  # through the join and out again


@pytest.mark.parametrize("lang", ["numpy", "torch", "einops"])
def test_grouped_rendered_code_runs_and_agrees(lang):
    torch = pytest.importorskip("torch") if lang == "torch" else None
    einops = pytest.importorskip("einops") if lang == "einops" else None
    specs = [spec(n, embed_dim=8, heads=4, kv_heads=2) for n in GROUPED]
    for a, b in itertools.permutations(specs, 2):
        p, w = ec.plan(a, b), _weights(a)
        scope = {"np": np, "w": w, "out": {}}
        if torch is not None:
            scope.update(torch=torch, w={k: torch.from_numpy(v) for k, v in w.items()})
        if einops is not None:
            scope["rearrange"] = einops.rearrange
        exec(p.code(lang), scope)  # our own generated code
        for k, v in p.apply(w).items():
            np.testing.assert_array_equal(np.asarray(scope["out"][k]), v, err_msg=f"{a.name} -> {b.name} {k} ({lang})")
        if torch is not None:
            assert all(isinstance(t, torch.Tensor) for t in p.apply(scope["w"]).values())

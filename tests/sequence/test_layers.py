"""The conventions pinned on the real layers: each framework's layer agrees with the numpy
reference, written from the equations, on the spec's own named weights."""

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import spec, tensor_shapes
from equivcheck.sequence.backends import backend_of, run

I, H, T, B = 4, 3, 4, 2  # noqa: E741
RECURRENT = [("torch:lstm", {}), ("keras:lstm", {}), ("onnx:lstm", {}), ("flax:lstm", {}),
             ("torch:gru", {}), ("keras:gru", {}), ("keras:gru", {"reset_after": False}),
             ("onnx:gru", {"linear_before_reset": True}), ("onnx:gru", {}),
             ("torch:rnn", {}), ("keras:rnn", {}), ("onnx:rnn", {})]


def _weights(s, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) * 0.5 for k, shape in tensor_shapes(s).items()}


def _need(backend):
    pytest.importorskip({"torch": "torch", "keras": "keras", "onnxruntime": "onnxruntime", "flax": "flax"}[backend])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize(("name", "kw"), RECURRENT, ids=[f"{n}{''.join(f'-{k}={v}' for k, v in kw.items())}" for n, kw in RECURRENT])
def test_recurrent_layer_matches_the_reference(name, kw, bidirectional):
    if bidirectional and name.startswith("flax"):
        pytest.skip("flax:lstm is the unidirectional LSTMCell")
    s = spec(name, input_size=I, units=H, bidirectional=bidirectional, **kw)
    _need(backend_of(s))
    dtype = "float32" if s.storage == "onnx" else "float64"  # onnxruntime's kernels are float32 only
    w = _weights(s)
    x = np.random.default_rng(2).standard_normal((B, T, I))
    got = run(backend_of(s), s, w, x, dtype=dtype)
    want = run("numpy", s, w, x, dtype=dtype)
    assert got.shape == (B, T, s.directions * H)
    np.testing.assert_allclose(got, want, atol=1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("name", ["torch:mha", "keras:mha", "flax:mha"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_layer_matches_the_reference(name, masked):
    s = spec(name, embed_dim=8, heads=2)
    _need(backend_of(s))
    w = _weights(s)
    rng = np.random.default_rng(3)
    qkv = tuple(rng.standard_normal((B, T, 8)) for _ in range(3))
    mask = np.tril(np.ones((T, T), bool)) if masked else None
    got = run(backend_of(s), s, w, qkv, dtype="float64", mask=mask)
    np.testing.assert_allclose(got, run("numpy", s, w, qkv, dtype="float64", mask=mask), atol=1e-12)
    if masked:  # the mask matters: the first query sees only the first key
        assert np.abs(got - run("numpy", s, w, qkv, dtype="float64")).max() > 1e-3


def test_checkpoint_layouts_as_their_models_read_them():
    """GPT-2 and GPT-NeoX attention, transcribed from transformers' modeling code (self-attention)."""
    E, N, Dh = 8, 2, 4
    rng = np.random.default_rng(4)
    x = rng.standard_normal((B, T, E))

    def attend(q, k, v):  # (B, T, N, Dh) each -> (B, T, E)
        s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(Dh)
        a = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bnts,bsnd->btnd", a / a.sum(-1, keepdims=True), v).reshape(B, T, E)

    s = spec("gpt2:mha", embed_dim=E, heads=N)
    w = _weights(s)
    qkv = x @ w["c_attn.weight"] + w["c_attn.bias"]  # Conv1D: x @ W + b, W (in, out)
    q, k, v = (a.reshape(B, T, N, Dh) for a in np.split(qkv, 3, axis=2))  # .split(split_size, dim=2)
    gpt2 = attend(q, k, v) @ w["c_proj.weight"] + w["c_proj.bias"]
    np.testing.assert_allclose(run("numpy", s, w, (x, x, x), dtype="float64"), gpt2, atol=1e-12)

    s = spec("neox:mha", embed_dim=E, heads=N)
    w = _weights(s)
    qkv = (x @ w["query_key_value.weight"].T + w["query_key_value.bias"]).reshape(B, T, N, 3 * Dh)
    q, k, v = qkv[..., :Dh], qkv[..., Dh:2 * Dh], qkv[..., 2 * Dh:]
    neox = attend(q, k, v) @ w["dense.weight"].T + w["dense.bias"]
    np.testing.assert_allclose(run("numpy", s, w, (x, x, x), dtype="float64"), neox, atol=1e-12)


GROUPED = [("llama:mha", 4), ("llama:mha", 2), ("llama:mha", 1), ("keras:mha", 2), ("keras:mha", 1)]


@pytest.mark.parametrize(("name", "kv_heads"), GROUPED, ids=[f"{n}-kv{k}" for n, k in GROUPED])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_attention_layer_matches_the_reference(name, kv_heads, masked):
    """Llama's projections on torch (scaled_dot_product_attention, enable_gqa) and Keras GroupQueryAttention.
    head_dim=4: Keras rounds its 1/√head_dim to float32 even in float64, exact only for powers of 4."""
    s = spec(name, embed_dim=8, heads=4, head_dim=4, kv_heads=kv_heads)
    _need(backend_of(s))
    w = _weights(s)
    assert {k: v.shape for k, v in w.items()} == tensor_shapes(s)
    rng = np.random.default_rng(5)
    qkv = tuple(rng.standard_normal((B, T, 8)) for _ in range(3))
    mask = np.tril(np.ones((T, T), bool)) if masked else None
    got = run(backend_of(s), s, w, qkv, dtype="float64", mask=mask)
    np.testing.assert_allclose(got, run("numpy", s, w, qkv, dtype="float64", mask=mask), atol=1e-12)


def _grouped_by_hand(w, x, N, K, Dh, kv_of):
    """Llama attention from its q/k/v/o_proj weights, query head h reading key/value head kv_of(h)."""
    q = (x @ w["q_proj.weight"].T + w["q_proj.bias"]).reshape(B, T, N, Dh)
    k, v = ((x @ w[f"{p}.weight"].T + w[f"{p}.bias"]).reshape(B, T, K, Dh) for p in ("k_proj", "v_proj"))
    idx = [kv_of(h) for h in range(N)]
    s = np.einsum("btnd,bsnd->bnts", q, k[:, :, idx]) / np.sqrt(Dh)
    a = np.exp(s - s.max(-1, keepdims=True))
    heads = np.einsum("bnts,bsnd->btnd", a / a.sum(-1, keepdims=True), v[:, :, idx]).reshape(B, T, N * Dh)
    return heads @ w["o_proj.weight"].T + w["o_proj.bias"]


@pytest.mark.parametrize("name", ["llama:mha", "keras:mha"])
def test_query_head_h_reads_kv_head_h_div_group(name):
    """The sharing rule, on the real layer: query head h reads key/value head h // (heads // kv_heads), not h % kv_heads."""
    N, K, Dh, E = 4, 2, 4, 8
    llama, s = spec("llama:mha", embed_dim=E, heads=N, head_dim=Dh, kv_heads=K), spec(name, embed_dim=E, heads=N, head_dim=Dh, kv_heads=K)
    _need(backend_of(s))
    w = _weights(llama, seed=6)
    x = np.random.default_rng(7).standard_normal((B, T, E))
    got = run(backend_of(s), s, ec.convert(llama, s, w), (x, x, x), dtype="float64")
    np.testing.assert_allclose(got, _grouped_by_hand(w, x, N, K, Dh, lambda h: h // (N // K)), atol=1e-12)
    assert np.abs(got - _grouped_by_hand(w, x, N, K, Dh, lambda h: h % K)).max() > 1e-2


def test_internlm2_layout_as_its_model_reads_it():
    """InternLM2 attention, transcribed from its modeling code: wqkv rearranged 'b q (h gs d) -> b q h gs d'
    (gs = group + 2), queries [..., :group, :] as heads (h gs), keys [..., -2, :], values [..., -1, :], repeat_kv."""
    N, K, Dh, E = 4, 2, 3, 8
    G = N // K
    s = spec("internlm2:mha", embed_dim=E, heads=N, head_dim=Dh, kv_heads=K)
    w = _weights(s, seed=8)
    x = np.random.default_rng(9).standard_normal((B, T, E))
    qkv = (x @ w["wqkv.weight"].T + w["wqkv.bias"]).reshape(B, T, K, G + 2, Dh)
    q = qkv[..., :G, :].reshape(B, T, N, Dh)
    k, v = (np.repeat(qkv[..., j, :], G, axis=2) for j in (-2, -1))  # repeat_kv: expand then reshape
    sc = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(Dh)
    a = np.exp(sc - sc.max(-1, keepdims=True))
    heads = np.einsum("bnts,bsnd->btnd", a / a.sum(-1, keepdims=True), v).reshape(B, T, N * Dh)
    want = heads @ w["wo.weight"].T + w["wo.bias"]
    np.testing.assert_allclose(run("numpy", s, w, (x, x, x), dtype="float64"), want, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_grouped_conversions_pass_on_the_real_layers(dtype):
    """A pass wherever the probed sums run wider than the dtype; where they run in it (Keras bfloat16 on some
    CPUs) the mutants may hide inside the bound: inconclusive, never a pass nor a fail."""
    pytest.importorskip("torch")
    pytest.importorskip("keras")
    llama, keras_ = (spec(n, embed_dim=8, heads=4, kv_heads=2) for n in ("llama:mha", "keras:mha"))
    case = ec.verify_pair(llama, keras_, source_backend="torch", target_backend="keras", dtype=dtype)
    assert case.comparison.passed and case.source_comparison.passed, case.reason
    names = {m.name for m in case.mutations}
    assert {"kv_sharing:tiled", "interleaved_as_stacked:kv_group", "qkv_order:q,v,k", "heads_head_dim_exchanged"} <= names
    rejected = all(m.outcome == "rejected" for m in case.mutations)
    assert case.verdict == ("pass" if rejected else "inconclusive"), case.reason
    if case.comparison.accumulate != dtype:
        assert rejected, case.reason


def test_a_tiled_kv_sharing_conversion_fails_and_is_named():
    pytest.importorskip("torch")
    llama, intern = (spec(n, embed_dim=8, heads=4, kv_heads=2) for n in ("llama:mha", "internlm2:mha"))
    tiled = [0, 2, 1, 3]  # the query heads relabelled as if the source read key/value head h % 2

    def converter(w):
        w = dict(w)
        w["q_proj.weight"] = w["q_proj.weight"].reshape(4, 2, 8)[tiled].reshape(8, 8)
        w["q_proj.bias"] = w["q_proj.bias"].reshape(4, 2)[tiled].reshape(8)
        w["o_proj.weight"] = w["o_proj.weight"].reshape(8, 4, 2)[:, tiled].reshape(8, 8)
        return ec.convert(llama, intern, w)

    case = ec.verify_pair(llama, intern, source_backend="torch", target_backend="numpy", converter=converter)
    assert case.verdict == "fail" and case.diagnosis["mutant"] == "kv_sharing:tiled", case.reason
    assert "query head h reads key/value head h % 2 instead of h // 2" in case.reason

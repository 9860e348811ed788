"""The conventions pinned on the real layers: each framework's layer agrees with the numpy
reference, written from the equations, on the spec's own named weights."""

import numpy as np
import pytest

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

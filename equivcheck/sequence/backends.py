"""Real recurrent and attention layers built from a spec: torch, Keras 3, ONNX Runtime, TFLite.

Each runner takes the spec's own named weights (numpy), the inputs and a dtype name, runs the
framework's layer and returns its output as float64 numpy: (batch, time, directions·units)
for a recurrent layer, (batch, query time, embed_dim) for attention. Frameworks are imported
inside the functions, on first use, through :func:`equivcheck.backends.get`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.dtypes import DTYPES, np_dtype
from equivcheck.errors import BackendUnavailable, SpecError
from equivcheck.sequence.named import tensor_shapes
from equivcheck.sequence.presets import BACKENDS
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec, SequenceSpec

__all__ = ["LOW_PRECISION", "backend_of", "run"]

#: The runtimes whose recurrent and attention layers run in float16 and bfloat16 (CPU).
LOW_PRECISION = ("numpy", "torch", "keras", "flax")


def backend_of(spec: SequenceSpec) -> str:
    """The runtime that runs a spec's layer: its storage's framework (``numpy``: the reference)."""
    return BACKENDS[spec.storage]


def run(backend: str, spec: SequenceSpec, weights: dict[str, Any], inputs: Any, *, dtype: str = "float32",
        mask: Any = None) -> np.ndarray:
    """Build ``spec``'s layer on ``backend``, set ``weights``, run ``inputs``; float64 numpy out."""
    expected = tensor_shapes(spec)
    if set(weights) != set(expected):
        raise SpecError(f"weights have keys {sorted(weights)}: {spec.describe()} expects {sorted(expected)}")
    if dtype not in DTYPES:
        raise SpecError(f"dtype={dtype!r} is not supported for sequence layers: expected one of {', '.join(DTYPES)}")
    runners = {"torch": _torch, "keras": _keras, "onnxruntime": _onnxruntime, "flax": _flax, "tflite": _tflite}
    if backend != "numpy" and backend not in runners:
        raise SpecError(f"backend={backend!r} does not run sequence layers: expected one of numpy, {', '.join(runners)}")
    if backend not in LOW_PRECISION and dtype in ("float16", "bfloat16"):
        raise SpecError(f"dtype={dtype!r} does not run on backend={backend!r} for sequence layers: "
                        f"float16/bfloat16 run on {', '.join(LOW_PRECISION)}; pass dtype='float32'")
    # Values rounded to dtype, held in float32 (float64) arrays: every framework takes those.
    hold = "float64" if dtype == "float64" else "float32"
    weights = {k: np.asarray(v, dtype=np_dtype(dtype)).astype(hold) for k, v in weights.items()}
    inputs = (tuple(np.asarray(a, dtype=np_dtype(dtype)).astype(hold) for a in inputs) if isinstance(inputs, tuple)
              else np.asarray(inputs, dtype=np_dtype(dtype)).astype(hold))
    if backend == "numpy":
        from equivcheck.sequence.reference import forward

        return forward(spec, weights, inputs, mask)
    if backend_of(spec) != backend:
        raise SpecError(f"backend={backend!r} does not take {spec.storage} weights ({spec.describe()}): "
                        f"convert them to a {backend} spec first")
    return runners[backend](spec, weights, inputs, dtype, mask)


def _load(name: str) -> Any:
    from equivcheck.backends import get

    return get(name).load()


def _torch(spec: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str, mask: Any) -> np.ndarray:
    torch = _load("torch")
    tdtype = getattr(torch, dtype)
    if isinstance(spec, AttentionSpec) and spec.storage == "llama":
        return _torch_llama(torch, spec, weights, inputs, tdtype, mask)
    if isinstance(spec, AttentionSpec):
        layer = torch.nn.MultiheadAttention(spec.embed_dim, spec.heads, bias=spec.bias, batch_first=True, dtype=tdtype)
    else:
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[spec.cell]
        layer = cls(spec.input_size, spec.units, batch_first=True, bidirectional=spec.bidirectional, dtype=tdtype)
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in weights.items()}, strict=True)
    layer.eval()
    with torch.no_grad():
        if isinstance(spec, AttentionSpec):
            q, k, v = (torch.from_numpy(np.ascontiguousarray(a)).to(tdtype) for a in inputs)
            attn_mask = None if mask is None else torch.from_numpy(~np.asarray(mask, dtype=bool))
            out = layer(q, k, v, need_weights=False, attn_mask=attn_mask)[0]
        else:
            out = layer(torch.from_numpy(np.ascontiguousarray(inputs)).to(tdtype))[0]
    return out.double().numpy()


def _torch_llama(torch: Any, spec: AttentionSpec, weights: dict[str, np.ndarray], inputs: Any, tdtype: Any,
                 mask: Any) -> np.ndarray:
    """Hugging Face Llama attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` Linear layers (their state dict
    loaded strictly), heads through ``scaled_dot_product_attention`` with ``enable_gqa`` (no rotary embedding)."""
    N, K, Dh, E = spec.heads, spec.kv_heads, spec.head_dim, spec.embed_dim
    F = torch.nn.functional
    layer = torch.nn.Module()
    for name, (n_in, n_out) in (("q_proj", (E, N * Dh)), ("k_proj", (E, K * Dh)), ("v_proj", (E, K * Dh)),
                                ("o_proj", (N * Dh, E))):
        layer.add_module(name, torch.nn.Linear(n_in, n_out, bias=spec.bias, dtype=tdtype))
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in weights.items()}, strict=True)
    q, k, v = (torch.from_numpy(np.ascontiguousarray(a)).to(tdtype) for a in inputs)
    batch, steps = q.shape[:2]
    attn_mask = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))  # True: may attend
    with torch.no_grad():
        Q = layer.q_proj(q).view(batch, steps, N, Dh).transpose(1, 2)
        Kx, V = (p(x).view(batch, x.shape[1], K, Dh).transpose(1, 2) for p, x in ((layer.k_proj, k), (layer.v_proj, v)))
        try:
            heads = F.scaled_dot_product_attention(Q, Kx, V, attn_mask=attn_mask, enable_gqa=True)
        except TypeError:  # torch before 2.5: the key/value heads repeated as enable_gqa does
            heads = F.scaled_dot_product_attention(Q, Kx.repeat_interleave(N // K, 1), V.repeat_interleave(N // K, 1),
                                                   attn_mask=attn_mask)
        out = layer.o_proj(heads.transpose(1, 2).reshape(batch, steps, N * Dh))
    return out.double().numpy()


def _keras_cell(keras: Any, spec: RecurrentSpec, dtype: str) -> Any:
    L = keras.layers
    common = dict(return_sequences=True, dtype=dtype, kernel_initializer="zeros", recurrent_initializer="zeros")
    if spec.cell == "lstm":
        return L.LSTM(spec.units, **common)
    if spec.cell == "gru":
        return L.GRU(spec.units, reset_after=spec.reset_after, **common)
    return L.SimpleRNN(spec.units, **common)


def _keras(spec: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str, mask: Any) -> np.ndarray:
    keras = _load("keras")
    if isinstance(spec, AttentionSpec):
        if spec.kv_heads != spec.heads:  # the same variable names, key and value with kv_heads heads
            layer = keras.layers.GroupQueryAttention(head_dim=spec.head_dim, num_query_heads=spec.heads,
                                                     num_key_value_heads=spec.kv_heads, use_bias=spec.bias, dtype=dtype)
        else:
            layer = keras.layers.MultiHeadAttention(spec.heads, spec.head_dim, use_bias=spec.bias, dtype=dtype)
        q, k, v = inputs
        layer(q, v, key=k)  # build; Keras takes (query, value, key)
        _keras_set(layer.weights, weights)
        out = layer(q, v, key=k, attention_mask=None if mask is None else np.broadcast_to(
            np.asarray(mask, dtype=bool), (q.shape[0], q.shape[1], k.shape[1])))
        return np.asarray(out, dtype=np.float64)
    x = inputs
    if spec.bidirectional:
        layer = keras.layers.Bidirectional(_keras_cell(keras, spec, dtype), dtype=dtype)
        layer(x)
        named = {f"forward/{w.name}": w for w in layer.forward_layer.weights}
        named.update({f"backward/{w.name}": w for w in layer.backward_layer.weights})
        for name, value in weights.items():
            named[name].assign(value)
    else:
        layer = _keras_cell(keras, spec, dtype)
        layer(x)
        _keras_set(layer.weights, weights)
    return np.asarray(layer(x), dtype=np.float64)


def _keras_set(variables: list[Any], weights: dict[str, np.ndarray]) -> None:
    """Assign each weight to the variable whose path ends with its name (``query/kernel``)."""
    for name, value in weights.items():
        hits = [v for v in variables if v.path.endswith("/" + name) or v.path == name]
        if len(hits) != 1:
            raise SpecError(f"weight {name!r} matches {len(hits)} Keras variables of {[v.path for v in variables]}")
        hits[0].assign(value)


def _flax(spec: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str, mask: Any) -> np.ndarray:
    import contextlib

    jax = _load("jax")
    try:
        import flax.linen as nn
    except ImportError as exc:
        raise BackendUnavailable(f"flax backend: {exc}; pip install flax") from None
    tree: dict[str, Any] = {}
    for name, value in weights.items():  # "query/kernel" -> {"query": {"kernel": ...}}
        *path, leaf = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
        jdtype = getattr(jax.numpy, dtype)
        if isinstance(spec, AttentionSpec):
            layer = nn.MultiHeadDotProductAttention(num_heads=spec.heads, qkv_features=spec.inner_dim,
                                                    out_features=spec.embed_dim, use_bias=spec.bias, dtype=jdtype,
                                                    param_dtype=jdtype, deterministic=True)
            q, k, v = (jax.numpy.asarray(a, dtype=jdtype) for a in inputs)
            m = None if mask is None else jax.numpy.asarray(np.asarray(mask, dtype=bool))[None, None]
            out = layer.apply({"params": tree}, q, k, v, mask=m)
        else:
            assert isinstance(spec, RecurrentSpec) and spec.cell == "lstm"
            layer = nn.RNN(nn.LSTMCell(spec.units, dtype=jdtype, param_dtype=jdtype))
            out = layer.apply({"params": {"cell": tree}}, jax.numpy.asarray(inputs, dtype=jdtype))
        return np.asarray(out, dtype=np.float64)


def _tflite(spec: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str, mask: Any) -> np.ndarray:
    """TFLite's fused LSTM / RNN op on its interpreter (:mod:`equivcheck.sequence.tflite`)."""
    del mask
    from equivcheck.sequence import tflite

    assert isinstance(spec, RecurrentSpec)
    return tflite.run(spec, weights, inputs, dtype)


def _onnxruntime(spec: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, dtype: str, mask: Any) -> np.ndarray:
    del mask
    try:
        import onnx
        import onnxruntime
        from onnx import helper
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime backend: {exc}; pip install onnx onnxruntime") from None
    assert isinstance(spec, RecurrentSpec)
    if dtype != "float32":
        raise SpecError(f"dtype={dtype!r}: onnxruntime's CPU LSTM, GRU and RNN kernels run float32 only")
    x = np.ascontiguousarray(np.swapaxes(np.asarray(inputs, dtype=dtype), 0, 1))  # ONNX reads (time, batch, in)
    elem = onnx.TensorProto.FLOAT if dtype == "float32" else onnx.TensorProto.DOUBLE
    attrs: dict[str, Any] = dict(hidden_size=spec.units, direction="bidirectional" if spec.bidirectional else "forward")
    if spec.cell == "gru":
        attrs["linear_before_reset"] = int(spec.reset_after)
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[spec.cell]
    node = helper.make_node(op, ["X", "W", "R", "B"], ["Y"], **attrs)
    inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(weights[n]), n) for n in ("W", "R", "B")]
    d = spec.directions
    graph = helper.make_graph([node], "sequence", [helper.make_tensor_value_info("X", elem, list(x.shape))],
                              [helper.make_tensor_value_info("Y", elem, [x.shape[0], d, x.shape[1], spec.units])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"X": x})[0]  # (time, dirs, batch, units)
    return np.asarray(y, dtype=np.float64).transpose(2, 0, 1, 3).reshape(x.shape[1], x.shape[0], d * spec.units)

"""Capture of recurrent and attention layers as a model runs: torch ``nn.LSTM``/``GRU``/``RNN`` and
``nn.MultiheadAttention`` (forward hooks), Keras 3 ``LSTM``/``GRU``/``SimpleRNN`` and ``MultiHeadAttention``
(the functional graph's call of the layer).

Each becomes a :class:`~equivcheck.modelcheck.layers.Linear` record of kind ``lstm``/``gru``/``rnn``/``mha``
whose ``config`` holds its spec (an :mod:`equivcheck.sequence` preset built from the layer's own
configuration), its weights as named tensors under its framework's names (``named``), its inputs
as ``(batch, time, features)`` (``inputs``; a torch layer that is not ``batch_first`` is brought
there), its class and parameter count. A layer outside what a spec describes gives the reason
instead, and stays unchecked by name. Checked by :mod:`equivcheck.modelcheck.sequence_pairs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.layers import Linear

__all__ = ["SEQUENCE_KINDS", "is_sequence", "keras_sequence", "keras_sequence_record", "torch_sequence_kind",
           "torch_sequence_record"]

SEQUENCE_KINDS = ("lstm", "gru", "rnn", "mha")
_TORCH = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn", "MultiheadAttention": "mha"}
_KERAS = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "rnn", "MultiHeadAttention": "mha"}


def is_sequence(record: Linear) -> bool:
    """Whether a captured record is a recurrent or attention layer (its config holds a sequence spec)."""
    return record.kind in SEQUENCE_KINDS and "sequence" in record.config


def _params(named: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).size for v in named.values()))


def _kernel(named: dict[str, np.ndarray]) -> np.ndarray:
    """Every weight that is not a bias, flat: the count pairing compares (the same for every framework's layout)."""
    parts = [np.asarray(v, np.float64).reshape(-1) for k, v in sorted(named.items()) if not _is_bias(k)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _is_bias(name: str) -> bool:
    return "bias" in name.split("/")[-1].split(".")[-1] or name == "B"


def _record(name: str, framework: str, kind: str, spec: Any, named: dict[str, np.ndarray], inputs: tuple[np.ndarray, ...],
            y: np.ndarray, cls: str, layer: Any, index: int) -> Linear:
    config = {"sequence": spec, "named": named, "inputs": inputs, "class": cls, "params": _params(named)}
    return Linear(name, framework, kind, _kernel(named), None, inputs[0], y, config, layer=layer, index=index)


# -- torch -------------------------------------------------------------------------------------
def torch_sequence_kind(module: Any) -> str | None:
    """``lstm``/``gru``/``rnn``/``mha`` for a torch recurrent or attention module (supported or not), else None."""
    import torch

    nn = torch.nn
    for cls in (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention):
        if isinstance(module, cls):
            return _TORCH[cls.__name__]
    return None


def _numpy(t: Any) -> np.ndarray:
    from equivcheck.dtypes import np_dtype

    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
        return t.float().numpy().astype(np_dtype("bfloat16"))
    return t.numpy().copy()


def _torch_unsupported(module: Any, kind: str, args: tuple, kwargs: dict[str, Any]) -> str:
    import torch

    if kind == "mha":
        e = module.embed_dim
        if module.kdim != e or module.vdim != e:
            return f"kdim={module.kdim}, vdim={module.vdim} differ from embed_dim={e}"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv/add_zero_attn"
        masks = {"key_padding_mask": 3, "attn_mask": 5}
        for key, at in masks.items():
            if kwargs.get(key) is not None or (len(args) > at and args[at] is not None):
                return f"called with {key}: masks are not checked yet"
        if kwargs.get("is_causal") or (len(args) > 7 and args[7]):
            return "called with is_causal=True: masks are not checked yet"
        qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)][:3]
        if len(qkv) < 3 or not all(isinstance(a, torch.Tensor) and a.ndim == 3 for a in qkv):
            return "not called on three batched (3-D) tensors"
        return ""
    if module.num_layers != 1:
        return f"num_layers={module.num_layers}: stacked layers are not checked yet"
    if module.bidirectional:
        return "bidirectional: not checked yet"
    if getattr(module, "proj_size", 0):
        return f"proj_size={module.proj_size}: not checked yet"
    if not module.bias:
        return "bias=False: not checked yet"
    if kind == "rnn" and module.nonlinearity != "tanh":
        return f"nonlinearity={module.nonlinearity!r}: only tanh is checked"
    if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
        return "called with an initial state: only a zero initial state is checked"
    if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 3:
        return "not called on a batched (3-D) tensor (a packed or unbatched sequence)"
    return ""


def torch_sequence_record(module: Any, name: str, args: tuple, kwargs: dict[str, Any], output: Any,
                          index: int) -> Linear | str:
    """The record of a torch recurrent or attention module as it ran, or why it is not checked."""
    from equivcheck.sequence.presets import spec

    kind = torch_sequence_kind(module)
    cls = type(module).__name__
    why = _torch_unsupported(module, kind, args, kwargs)
    if why:
        return f"{cls} {why}"
    first = module.batch_first

    def seq(t: Any) -> np.ndarray:  # (batch, time, features)
        a = _numpy(t)
        return a if first else np.ascontiguousarray(np.swapaxes(a, 0, 1))

    named = {k: _numpy(v) for k, v in module.state_dict().items()}
    y = output[0] if isinstance(output, tuple) else output
    if kind == "mha":
        qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)][:3]
        s = spec("torch:mha", embed_dim=module.embed_dim, heads=module.num_heads, bias=module.in_proj_bias is not None)
        inputs = tuple(seq(a) for a in qkv)
    else:
        s = spec(f"torch:{kind}", input_size=module.input_size, units=module.hidden_size)
        inputs = (seq(args[0]),)
    return _record(name, "torch", kind, s, named, inputs, seq(y), cls, module, index)


# -- Keras 3 -----------------------------------------------------------------------------------
def keras_sequence(layer: Any, *, retraced: bool = False) -> tuple[str, dict[str, Any]] | str | None:
    """``(kind, config)`` of a Keras 3 recurrent or attention layer (the config holds its spec and the symbolic
    tensors to capture: its inputs, then its output); why it is not checked; or None for other layers.
    ``retraced``: the layer was called again when a nested model was flattened (its last call is the graph's)."""
    from equivcheck.sequence.presets import spec

    cls = type(layer).__name__
    kind = _KERAS.get(cls)
    if kind is None:
        return None
    nodes = list(getattr(layer, "_inbound_nodes", []))
    node = nodes[-1] if retraced and nodes else (nodes[0] if len(nodes) == 1 else None)
    if node is None:
        return f"{cls} called more than once in the graph: not checked yet"
    if not hasattr(node, "arguments") or not all(hasattr(w, "path") for w in layer.weights):
        return f"{cls} of Keras 2 (tf_keras): recurrent and attention layers are checked in Keras 3 only"
    cfg = layer.get_config()
    args, kwargs = list(node.arguments.args), dict(node.arguments.kwargs)
    if kind == "mha":
        extra = {k: v for k, v in kwargs.items() if k not in ("key", "training") and v not in (None, False)}
        if any(a is not None for a in args[3:]) or extra:
            return f"{cls} called with {', '.join(sorted(extra)) or 'masks'}: masks are not checked yet"
        if cfg.get("use_gate") or cfg.get("sliding_window") or cfg.get("output_shape") is not None:
            return f"{cls} with use_gate/sliding_window/output_shape: not checked yet"
        if cfg.get("value_dim") not in (None, cfg["key_dim"]):
            return f"{cls} value_dim={cfg['value_dim']} differs from key_dim={cfg['key_dim']}: not checked yet"
        key = kwargs.get("key")
        if key is None and len(args) > 2:
            key = args[2]
        q, v = args[0], args[1]
        k = v if key is None else key
        dims = {int(t.shape[-1]) for t in (q, k, v)}
        if len(dims) != 1 or any(len(t.shape) != 3 for t in (q, k, v)):
            return f"{cls} with query, key and value of other sizes or ranks: not checked yet"
        s = spec("keras:mha", embed_dim=dims.pop(), heads=int(cfg["num_heads"]), head_dim=int(cfg["key_dim"]),
                 bias=bool(cfg.get("use_bias", True)))
        return kind, {"sequence": s, "class": cls, "tensors": [q, k, v, node.output_tensors[0]]}
    if not cfg.get("return_sequences") or cfg.get("return_state") or cfg.get("go_backwards") or cfg.get("stateful"):
        return (f"{cls} with return_sequences={cfg.get('return_sequences')}, return_state={cfg.get('return_state')}, "
                f"go_backwards={cfg.get('go_backwards')}, stateful={cfg.get('stateful')}: only a whole sequence out "
                "(return_sequences=True, no state) is checked")
    if cfg.get("activation") != "tanh" or cfg.get("recurrent_activation", "sigmoid") != "sigmoid" \
            or not cfg.get("use_bias", True):
        return f"{cls} with activation/recurrent_activation other than tanh/sigmoid or use_bias=False: not checked yet"
    if any(a is not None for a in args[1:]) or any(v is not None for k, v in kwargs.items() if k != "training"):
        return f"{cls} called with an initial state or a mask: only a zero initial state, unmasked, is checked"
    x = args[0]
    if len(x.shape) != 3:
        return f"{cls} on a {len(x.shape)}-D input: expected (batch, time, features)"
    extra = {"reset_after": bool(cfg.get("reset_after", True))} if kind == "gru" else {}
    s = spec(f"keras:{kind}", input_size=int(x.shape[-1]), units=int(cfg["units"]), **extra)
    return kind, {"sequence": s, "class": cls, "tensors": [x, node.output_tensors[0]]}


def keras_sequence_record(layer: Any, kind: str, cfg: dict[str, Any], values: list[Any], index: int) -> Linear:
    """The record of a Keras recurrent or attention layer from its captured tensors (``cfg["tensors"]``' values)."""
    from equivcheck.sequence.named import tensor_shapes

    s = cfg["sequence"]
    named = {}
    for key in tensor_shapes(s):
        hits = [w for w in layer.weights if w.path.endswith("/" + key)]
        if len(hits) != 1:
            raise EquivcheckError(f"Keras layer {layer.name!r}: weight {key!r} matches {len(hits)} variables of "
                                  f"{[w.path for w in layer.weights]}")
        named[key] = np.asarray(hits[0])
    arrays = [np.asarray(v) for v in values]
    return _record(layer.name, "keras", kind, s, named, tuple(arrays[:-1]), arrays[-1], cfg["class"], layer, index)

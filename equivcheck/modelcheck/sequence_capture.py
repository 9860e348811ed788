"""Capture of recurrent and attention layers as a model runs: torch ``nn.LSTM``/``GRU``/``RNN`` and
``nn.MultiheadAttention`` (forward hooks), Keras 3 ``LSTM``/``GRU``/``SimpleRNN`` (bare or in ``Bidirectional``)
and ``MultiHeadAttention`` (the functional graph's call of the layer).

Each becomes a :class:`~equivcheck.modelcheck.layers.Linear` record of kind ``lstm``/``gru``/``rnn``/``mha``
whose ``config`` holds its spec (an :mod:`equivcheck.sequence` preset built from the layer's own
configuration), its weights as named tensors under its framework's names (``named``), its inputs
as ``(batch, time, features)`` (``inputs``; a torch layer that is not ``batch_first`` is brought
there), its class and parameter count. A torch layer of ``num_layers=N`` becomes N records, one per stacked
layer, named ``lstm[0]`` … ``lstm[N-1]`` (the module's name and the layer's index; ``lstm#2[0]`` for the first
layer of a module's second call): record ``k`` holds the weights ``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}`` (and ``_reverse``) under its spec's names (``…_l0``; ``names`` maps them to
the module's), its input is layer ``k-1``'s whole output sequence and its output layer ``k``'s. Those
come from the module's sub-layers run one by one (each a one-layer module holding its weights, on its
device and dtype), which must reproduce the module's own output bit for bit, else the module stays
unchecked, saying so. So a torch stack pairs with N stacked Keras layers (``return_sequences=True``),
either way. A bidirectional torch layer and a Keras ``Bidirectional``
wrapper (``merge_mode="concat"``, the backward layer the forward one reading backwards) are one
``bidirectional=True`` spec. An attention call's masks are captured as one ``(batch, query, key)``
boolean ``mask`` (True: may attend) or, where they cannot be described (a float mask adding finite
values, a mask differing per head), ``mask_unknown`` says why. A layer outside what a spec describes
gives the reason instead, and stays unchecked by name. Checked by
:mod:`equivcheck.modelcheck.sequence_pairs`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.layers import Linear
from equivcheck.sequence.named import tensor_shapes

__all__ = ["SEQUENCE_KINDS", "is_sequence", "keras_sequence", "keras_sequence_record", "sequence_record", "torch_sequence_kind",
           "torch_sequence_records"]

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


def sequence_record(name: str, framework: str, kind: str, spec: Any, named: dict[str, np.ndarray], inputs: tuple[np.ndarray, ...],
            y: np.ndarray, cls: str, layer: Any, index: int, mask: np.ndarray | None = None, mask_unknown: str = "") -> Linear:
    config = {"sequence": spec, "named": named, "inputs": inputs, "class": cls, "params": _params(named),
              "mask": mask, "mask_unknown": mask_unknown}
    return Linear(name, framework, kind, _kernel(named), None, inputs[0], y, config, layer=layer, index=index)


def _or_none(allowed: np.ndarray) -> np.ndarray | None:
    """The ``(batch, query, key)`` mask (True: may attend), None where it allows everything."""
    return None if bool(np.all(allowed)) else allowed


def _causal(steps: int, keys: int) -> np.ndarray:
    """Query ``t`` may attend keys ``0..t`` (torch's ``is_causal``, Keras' ``use_causal_mask``)."""
    return np.tril(np.ones((steps, keys), bool))


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
        qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)][:3]
        if len(qkv) < 3 or not all(isinstance(a, torch.Tensor) and a.ndim == 3 for a in qkv):
            return "not called on three batched (3-D) tensors"
        return ""
    if module.num_layers > 1 and module.dropout and module.training:
        return (f"num_layers={module.num_layers} with dropout={module.dropout} in training mode: the dropout between "
                "its stacked layers is random (checked in eval mode)")
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


def torch_sequence_records(module: Any, name: str, args: tuple, kwargs: dict[str, Any], output: Any,
                           index: int) -> list[Linear] | str:
    """The records of a torch recurrent or attention module as it ran (one per stacked layer: ``name[k]`` where
    ``num_layers`` > 1), or why it is not checked."""
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
    mask, unknown = None, ""
    if kind == "mha":
        qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)][:3]
        s = spec("torch:mha", embed_dim=module.embed_dim, heads=module.num_heads, bias=module.in_proj_bias is not None)
        inputs = tuple(seq(a) for a in qkv)
        mask, unknown = _torch_mask(module, args, kwargs, inputs[0].shape[0], inputs[0].shape[1], inputs[1].shape[1])
        return [sequence_record(name, "torch", kind, s, named, inputs, seq(y), cls, module, index, mask, unknown)]
    bidirectional = bool(module.bidirectional)
    if module.num_layers == 1:
        s = spec(f"torch:{kind}", input_size=module.input_size, units=module.hidden_size, bidirectional=bidirectional)
        return [sequence_record(name, "torch", kind, s, named, (seq(args[0]),), seq(y), cls, module, index)]
    outs = _stacked_outputs(module, args[0])
    if isinstance(outs, str):
        return f"{cls} num_layers={module.num_layers}: {outs}"
    if outs[-1].shape != y.shape or not _equal(outs[-1], y):
        return (f"{cls} num_layers={module.num_layers}: its layers run one by one do not reproduce its output bit for "
                "bit, so no layer's input is known exactly")
    records = []
    for k, (x, out) in enumerate(zip([args[0], *outs[:-1]], outs)):
        size = module.input_size if k == 0 else module.hidden_size * (2 if bidirectional else 1)
        s = spec(f"torch:{kind}", input_size=size, units=module.hidden_size, bidirectional=bidirectional)
        names = {key: _layer_name(key, k) for key in tensor_shapes(s)}  # the spec's name → the module's
        if not set(names.values()) <= set(named):
            return f"{cls} num_layers={module.num_layers}: layer {k}'s weights {sorted(set(names.values()) - set(named))} not found"
        rec = sequence_record(f"{name}[{k}]", "torch", kind, s, {key: named[real] for key, real in names.items()}, (seq(x),),
                      seq(y if k == module.num_layers - 1 else out), cls, module, index + k)
        rec.config.update(module=name, stacked=(k, module.num_layers), names=names)
        records.append(rec)
    return records


def _layer_name(key: str, k: int) -> str:
    """``weight_ih_l0`` (a one-layer spec's name) as stacked layer ``k``'s: ``weight_ih_l{k}`` (``_reverse`` kept)."""
    return re.sub(r"_l0(?=$|_reverse$)", f"_l{k}", key)


def _equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _stacked_outputs(module: Any, x: Any) -> list[Any] | str:
    """Each stacked layer's whole output sequence (the module's own layout): its layers run one by one, each as a
    one-layer module of the same class, dtype and device holding that layer's weights (built without drawing
    random numbers), on the previous one's output."""
    import torch

    p = next(module.parameters())
    extra = {"nonlinearity": module.nonlinearity} if isinstance(module, torch.nn.RNN) else {}
    state = module.state_dict()
    outs: list[Any] = []
    h = x
    with torch.no_grad():
        for k in range(module.num_layers):
            size = module.input_size if k == 0 else module.hidden_size * (2 if module.bidirectional else 1)
            try:
                sub = type(module)(size, module.hidden_size, num_layers=1, bias=True, batch_first=module.batch_first,
                                   bidirectional=module.bidirectional, device="meta", dtype=p.dtype, **extra)
                sub = sub.to_empty(device=p.device)
                sub.load_state_dict({key: state[_layer_name(key, k)] for key in sub.state_dict()})
                h = sub.eval()(h)[0]
            except Exception as exc:  # a subclass that cannot be built this way: the module stays unchecked
                line = (str(exc).strip().splitlines() or [""])[0]
                return f"its layer {k} cannot be run alone ({type(exc).__name__}: {line})"
            outs.append(h)
    return outs


def _torch_mask(module: Any, args: tuple, kwargs: dict[str, Any], batch: int, steps: int,
                keys: int) -> tuple[np.ndarray | None, str]:
    """``nn.MultiheadAttention``'s ``key_padding_mask``, ``attn_mask`` and ``is_causal`` as one ``(batch, query,
    key)`` mask, True where a query may attend (torch's boolean masks are True where it may *not*; a float mask
    adds: 0 allows, -inf blocks); else (None, why it cannot be described)."""
    def arg(key: str, at: int) -> Any:
        return kwargs[key] if key in kwargs else (args[at] if len(args) > at else None)

    allowed = np.ones((batch, steps, keys), bool)
    for key, at in (("key_padding_mask", 3), ("attn_mask", 5)):
        t = arg(key, at)
        if t is None:
            continue
        a = _numpy(t)
        if a.dtype != bool:
            a = np.asarray(a, np.float64)
            if not np.all((a == 0) | np.isneginf(a)):
                return None, f"called with a float {key} holding finite non-zero values (a bias on the scores)"
            a = np.isneginf(a)
        if key == "key_padding_mask":
            if a.shape != (batch, keys):
                return None, f"called with key_padding_mask of shape {a.shape}: expected (batch, keys) {(batch, keys)}"
            allowed &= ~a[:, None, :]
            continue
        if a.ndim == 3 and a.shape[0] == batch * module.num_heads:
            per = a.reshape(batch, module.num_heads, steps, keys)
            if not np.all(per == per[:, :1]):
                return None, "called with an attn_mask that differs between heads"
            a = per[:, 0]
        if a.shape[-2:] != (steps, keys):
            return None, f"called with attn_mask of shape {a.shape}: expected (query, key) {(steps, keys)}"
        if arg("is_causal", 7) and not np.all(~a == _causal(steps, keys)):
            return None, "called with is_causal=True and an attn_mask that is not causal: torch may apply either"
        allowed &= ~a
    if arg("is_causal", 7):
        allowed &= _causal(steps, keys)
    return _or_none(allowed), ""


# -- Keras 3 -----------------------------------------------------------------------------------
def keras_sequence(layer: Any, *, retraced: bool = False) -> tuple[str, dict[str, Any]] | str | None:
    """``(kind, config)`` of a Keras 3 recurrent or attention layer (the config holds its spec and the symbolic
    tensors to capture: its inputs, then its output); why it is not checked; or None for other layers.
    ``retraced``: the layer was called again when a nested model was flattened (its last call is the graph's)."""
    from equivcheck.sequence.presets import spec

    cls = type(layer).__name__
    wrapped = getattr(layer, "forward_layer", None) if cls == "Bidirectional" else None
    kind = _KERAS.get(type(wrapped).__name__ if wrapped is not None else cls)
    if kind is None or (wrapped is not None and kind == "mha"):
        return None
    nodes = list(getattr(layer, "_inbound_nodes", []))
    node = nodes[-1] if retraced and nodes else (nodes[0] if len(nodes) == 1 else None)
    if node is None:
        return f"{cls} called more than once in the graph: not checked yet"
    if not hasattr(node, "arguments") or not all(hasattr(w, "path") for w in layer.weights):
        return f"{cls} of Keras 2 (tf_keras): recurrent and attention layers are checked in Keras 3 only"
    cfg = layer.get_config()
    args, kwargs = list(node.arguments.args), dict(node.arguments.kwargs)
    if wrapped is not None:
        return _keras_bidirectional(layer, kind, node)
    if kind == "mha":
        bound = dict(zip(_MHA_ARGS, args)) | kwargs
        if bound.get("return_attention_scores"):
            return f"{cls} called with return_attention_scores=True: not checked yet"
        if cfg.get("use_gate") or cfg.get("sliding_window") or cfg.get("output_shape") is not None:
            return f"{cls} with use_gate/sliding_window/output_shape: not checked yet"
        if cfg.get("value_dim") not in (None, cfg["key_dim"]):
            return f"{cls} value_dim={cfg['value_dim']} differs from key_dim={cfg['key_dim']}: not checked yet"
        key = bound.get("key")
        q, v = bound["query"], bound["value"]
        k = v if key is None else key
        dims = {int(t.shape[-1]) for t in (q, k, v)}
        if len(dims) != 1 or any(len(t.shape) != 3 for t in (q, k, v)):
            return f"{cls} with query, key and value of other sizes or ranks: not checked yet"
        s = spec("keras:mha", embed_dim=dims.pop(), heads=int(cfg["num_heads"]), head_dim=int(cfg["key_dim"]),
                 bias=bool(cfg.get("use_bias", True)))
        masks = _keras_masks(bound, q, v, key)
        if isinstance(masks, str):
            return f"{cls} {masks}"
        return kind, {"sequence": s, "class": cls, "tensors": [q, k, v, *masks.values(), node.output_tensors[0]],
                      "masks": list(masks), "causal": bool(bound.get("use_causal_mask"))}
    if cfg.get("return_state") or cfg.get("go_backwards") or cfg.get("stateful"):
        return (f"{cls} with return_state={cfg.get('return_state')}, go_backwards={cfg.get('go_backwards')}, "
                f"stateful={cfg.get('stateful')}: only a layer reading forward from a zero state, its state not "
                "returned, is checked")
    if cfg.get("activation") != "tanh" or cfg.get("recurrent_activation", "sigmoid") != "sigmoid" \
            or not cfg.get("use_bias", True):
        return f"{cls} with activation/recurrent_activation other than tanh/sigmoid or use_bias=False: not checked yet"
    if any(a is not None for a in args[1:]) or any(v is not None for k, v in kwargs.items() if k != "training"):
        return f"{cls} called with an initial state or a mask: only a zero initial state, unmasked, is checked"
    x = args[0]
    if len(x.shape) != 3 or _keras_mask_of(x) is not None:
        return f"{cls} on a {len(x.shape)}-D or masked input: expected (batch, time, features), unmasked"
    extra = {"reset_after": bool(cfg.get("reset_after", True))} if kind == "gru" else {}
    s = spec(f"keras:{kind}", input_size=int(x.shape[-1]), units=int(cfg["units"]), **extra)
    return kind, {"sequence": s, "class": cls, "tensors": [x, node.output_tensors[0]],
                  "last_step": not cfg.get("return_sequences")}


def keras_sequence_record(layer: Any, kind: str, cfg: dict[str, Any], values: list[Any], index: int) -> Linear:
    """The record of a Keras recurrent or attention layer from its captured tensors (``cfg["tensors"]``' values)."""
    from equivcheck.sequence.named import tensor_shapes

    s = cfg["sequence"]
    named = {}
    for key in tensor_shapes(s):
        prefix, _, leaf = key.rpartition("/")
        held = {"forward": "forward_layer", "backward": "backward_layer"}.get(prefix)
        weights = getattr(layer, held).weights if held else layer.weights
        hits = [w for w in weights if w.path.endswith("/" + (leaf if held else key))]
        if len(hits) != 1:
            raise EquivcheckError(f"Keras layer {layer.name!r}: weight {key!r} matches {len(hits)} variables of "
                                  f"{[w.path for w in layer.weights]}")
        named[key] = np.asarray(hits[0])
    arrays = [np.asarray(v) for v in values]
    if kind != "mha":
        record = sequence_record(layer.name, "keras", kind, s, named, (arrays[0],), arrays[-1], cfg["class"], layer, index)
        record.config["last_step"] = cfg.get("last_step", False)  # return_sequences=False: (batch, units) out
        return record
    q, k = arrays[0], arrays[1]
    allowed = np.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
    for role, value in zip(cfg["masks"], arrays[3:-1]):  # Keras' _compute_attention_mask: every mask and-ed
        m = np.asarray(value).astype(bool)
        if role == "query":
            allowed &= m[:, :, None]
        elif role in ("value", "key"):
            allowed &= m[:, None, :]
        else:
            allowed &= np.broadcast_to(m, allowed.shape)
    if cfg["causal"]:
        allowed &= _causal(q.shape[1], k.shape[1])
    return sequence_record(layer.name, "keras", kind, s, named, tuple(arrays[:3]), arrays[-1], cfg["class"], layer, index,
                   _or_none(allowed))


_MHA_ARGS = ("query", "value", "key", "query_mask", "value_mask", "key_mask", "attention_mask",
             "return_attention_scores", "training", "use_causal_mask")


def _keras_mask_of(t: Any) -> Any:
    from keras import backend

    get = getattr(backend, "get_keras_mask", None)
    return get(t) if get is not None else getattr(t, "_keras_mask", None)


def _keras_masks(bound: dict[str, Any], q: Any, v: Any, key: Any) -> dict[str, Any] | str:
    """The masks a Keras ``MultiHeadAttention`` call combines, role → symbolic tensor (or constant): the query's
    own Keras mask, the value's and key's (given or their own), ``attention_mask``; or why one cannot be captured.
    The combination is checked where it counts: the layer's own output must be what the mask describes."""
    found: dict[str, Any] = {}
    candidates = {"query": _keras_mask_of(q),
                  "value": bound.get("value_mask") if bound.get("value_mask") is not None else _keras_mask_of(v),
                  "key": None if key is None or key is v else
                  (bound.get("key_mask") if bound.get("key_mask") is not None else _keras_mask_of(key)),
                  "attention": bound.get("attention_mask")}
    for role, t in candidates.items():
        if t is None:
            continue
        if not hasattr(t, "shape") or (role != "attention" and len(t.shape) != 2) or \
                (role == "attention" and len(t.shape) not in (2, 3)):
            return f"called with a {role} mask of shape {getattr(t, 'shape', type(t).__name__)}: not captured"
        found[role] = t
    return found


def _keras_bidirectional(layer: Any, kind: str, node: Any) -> tuple[str, dict[str, Any]] | str:
    """A Keras ``Bidirectional`` wrapper of an LSTM/GRU/SimpleRNN: both directions as one bidirectional spec."""
    from equivcheck.sequence.presets import spec

    args, kwargs = list(node.arguments.args), dict(node.arguments.kwargs)
    fw, bw = layer.forward_layer, layer.backward_layer
    cls = f"Bidirectional({type(fw).__name__})"
    wcfg, fcfg, bcfg = layer.get_config(), fw.get_config(), bw.get_config()
    if wcfg.get("merge_mode") != "concat":
        return f"{cls} with merge_mode={wcfg.get('merge_mode')!r}: only 'concat' is checked"
    same = {k: v for k, v in fcfg.items() if k not in ("name", "go_backwards", "trainable")}
    other = {k: v for k, v in bcfg.items() if k not in ("name", "go_backwards", "trainable")}
    if type(bw) is not type(fw) or same != other or fcfg.get("go_backwards") or not bcfg.get("go_backwards"):
        return f"{cls} whose backward layer is not the forward one reading backwards: not checked yet"
    if not fcfg.get("return_sequences") or fcfg.get("return_state") or fcfg.get("stateful"):
        return f"{cls} with return_sequences={fcfg.get('return_sequences')}, return_state={fcfg.get('return_state')}, " \
               f"stateful={fcfg.get('stateful')}: only a whole sequence out is checked"
    if fcfg.get("activation") != "tanh" or fcfg.get("recurrent_activation", "sigmoid") != "sigmoid" \
            or not fcfg.get("use_bias", True):
        return f"{cls} with activation/recurrent_activation other than tanh/sigmoid or use_bias=False: not checked yet"
    if any(a is not None for a in args[1:]) or any(v is not None for k, v in kwargs.items() if k != "training"):
        return f"{cls} called with an initial state or a mask: only a zero initial state, unmasked, is checked"
    x = args[0]
    if len(x.shape) != 3 or _keras_mask_of(x) is not None:
        return f"{cls} on a {len(x.shape)}-D or masked input: expected (batch, time, features), unmasked"
    extra = {"reset_after": bool(fcfg.get("reset_after", True))} if kind == "gru" else {}
    s = spec(f"keras:{kind}", input_size=int(x.shape[-1]), units=int(fcfg["units"]), bidirectional=True, **extra)
    return kind, {"sequence": s, "class": cls, "tensors": [x, node.output_tensors[0]]}

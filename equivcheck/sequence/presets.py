"""Presets of recurrent and attention layers: ``spec("torch:lstm", input_size=32, units=64)``.

| name | parameters | gates | reset | bias |
|---|---|---|---|---|
| ``torch:lstm/gru/rnn`` | ``weight_ih_l0`` (G·H, in), ``weight_hh_l0`` (G·H, H), ``bias_ih_l0``, ``bias_hh_l0`` (+ ``_reverse``) | i,f,g,o / r,z,n | after | two |
| ``keras:lstm/gru/rnn`` | ``kernel`` (in, G·H), ``recurrent_kernel`` (H, G·H), ``bias`` (G·H) or GRU ``reset_after`` (2, G·H) | i,f,c,o / z,r,h | ``reset_after=`` (True) | summed / two |
| ``onnx:lstm/gru/rnn`` | ``W`` (dirs, G·H, in), ``R`` (dirs, G·H, H), ``B`` (dirs, 2·G·H) | i,o,f,c / z,r,h | ``linear_before_reset=`` (0) | two |
| ``flax:lstm`` | ``ii/kernel`` … ``io/kernel`` (in, H), ``hi/kernel`` … (H, H), ``hi/bias`` … (H) | i,f,g,o | — | summed |
| ``tflite:lstm/rnn`` | ``input_to_input_weights`` … (H, in), ``recurrent_to_input_weights`` … (H, H), ``input_gate_bias`` … (H); RNN ``weights``, ``recurrent_weights``, ``bias`` (+ ``fw_``/``bw_``) | i,f,c,o | — (no fused GRU op) | summed |
| ``torch:mha`` | ``in_proj_weight`` (3E, E) q;k;v, ``in_proj_bias``, ``out_proj.weight`` (E, E), ``out_proj.bias`` | | | |
| ``keras:mha`` | ``query/kernel`` (E, heads, head_dim), ``query/bias`` (heads, head_dim), … ``attention_output/kernel`` (heads, head_dim, E) | | | |
| ``flax:mha`` | as Keras, the output named ``out`` | | | |
| ``gpt2:mha`` | ``c_attn.weight`` (E, 3E) Conv1D (in, out), ``c_attn.bias``, ``c_proj.weight`` (E, E) (in, out), ``c_proj.bias`` | | | |
| ``neox:mha`` | ``query_key_value.weight`` (3E, E) rows (heads, q;k;v, head_dim), ``dense.weight`` (E, E) | | | |
| ``llama:mha`` | ``q_proj.weight`` (heads·head_dim, E), ``k_proj.weight``, ``v_proj.weight`` (kv_heads·head_dim, E), ``o_proj.weight`` (E, heads·head_dim) | | | |
| ``internlm2:mha`` | ``wqkv.weight`` (kv_heads·(group+2)·head_dim, E) per kv group: q heads, k, v; ``wo.weight`` (E, heads·head_dim) | | | |

``kv_heads=`` (grouped-query attention) applies to ``keras:mha`` (Keras ``GroupQueryAttention``),
``llama:mha`` (torch) and ``internlm2:mha`` (the numpy reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from equivcheck.errors import SpecError
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec, SequenceSpec

__all__ = ["ATTENTION", "BACKENDS", "LAYERS", "RECURRENT", "is_sequence_name", "spec", "spec_from_flags"]

#: (storage, cell) of every recurrent preset → the spec fields that differ from the defaults.
RECURRENT = {
    ("torch", "lstm"): dict(gate_order="ifgo"),
    ("torch", "gru"): dict(gate_order="rzn"),
    ("torch", "rnn"): dict(),
    ("keras", "lstm"): dict(gate_order="ifgo", summed_bias=True),
    ("keras", "gru"): dict(gate_order="zrn"),
    ("keras", "rnn"): dict(summed_bias=True),
    ("onnx", "lstm"): dict(gate_order="iofg"),
    ("onnx", "gru"): dict(gate_order="zrn", reset_after=False),
    ("onnx", "rnn"): dict(),
    ("flax", "lstm"): dict(gate_order="ifgo", summed_bias=True),
    ("tflite", "lstm"): dict(gate_order="ifgo", summed_bias=True),
    ("tflite", "rnn"): dict(summed_bias=True),
}
#: The storages that have an ``mha`` preset.
ATTENTION = ("torch", "keras", "flax", "gpt2", "neox", "llama", "internlm2")
LAYERS = {"lstm", "gru", "rnn", "mha"}
#: The runtime that runs each storage's layers (GPT-2, GPT-NeoX and InternLM2 checkpoints: the numpy reference;
#: Llama's separate projections: torch, through ``scaled_dot_product_attention``).
BACKENDS = {"torch": "torch", "keras": "keras", "onnx": "onnxruntime", "flax": "flax", "tflite": "tflite", "gpt2": "numpy", "neox": "numpy",
            "llama": "torch", "internlm2": "numpy"}


def is_sequence_name(name: Any) -> bool:
    """Whether ``name`` is ``PRESET:LAYER`` with a recurrent or attention layer."""
    return isinstance(name, str) and name.count(":") == 1 and name.split(":")[1] in LAYERS


def spec(name: str, *, input_size: int | None = None, units: int | None = None, embed_dim: int | None = None,
         heads: int | None = None, head_dim: int | None = None, kv_heads: int | None = None, bidirectional: bool = False,
         reset_after: bool | None = None, linear_before_reset: bool | None = None, **overrides: Any) -> SequenceSpec:
    """The spec of a preset recurrent or attention layer.

    Recurrent layers take ``input_size`` and ``units`` (``bidirectional=``; Keras GRU
    ``reset_after=``, ONNX GRU ``linear_before_reset=``); attention layers ``embed_dim`` and
    ``heads`` (``head_dim=`` for Keras, Flax, Llama and InternLM2; ``kv_heads=`` for Keras, Llama and
    InternLM2). Other spec fields may be given by keyword.
    """
    storage, layer = name.split(":")
    kind = AttentionSpec if layer == "mha" else RecurrentSpec
    known = {f.name for f in dataclasses.fields(kind)}
    for key in sorted(set(overrides) - known):
        raise SpecError(f"{key}={overrides[key]!r} does not apply to {name}: a {kind.__name__} takes "
                        f"{', '.join(sorted(known - {'name', 'storage'}))}")
    if layer == "mha":
        if storage not in ATTENTION:
            raise SpecError(f"preset={storage!r} has no mha layer: expected one of {', '.join(f'{s}:mha' for s in ATTENTION)}")
        for key, value in (("embed_dim", embed_dim), ("heads", heads)):
            if value is None:
                raise SpecError(f"{key} is missing for {name}: pass {key}=N")
        extra = {k: v for k, v in (("head_dim", head_dim), ("kv_heads", kv_heads)) if v is not None}
        return AttentionSpec(embed_dim=embed_dim, heads=heads, storage=storage, name=name, **extra, **overrides)
    if kv_heads is not None:
        raise SpecError(f"kv_heads={kv_heads!r} does not apply to {name}: only attention (mha) layers take it")
    if (storage, layer) == ("tflite", "gru"):
        raise SpecError(f"spec name={name!r}: TFLite's runtime has no fused GRU op (the converter lowers a GRU to a WHILE "
                        "loop of builtin ops, its weights unnamed constants): expected tflite:lstm or tflite:rnn")
    if (storage, layer) not in RECURRENT:
        choices = ", ".join(f"{s}:{cell}" for s, cell in RECURRENT)
        raise SpecError(f"spec name={name!r} is not a recurrent preset: expected one of {choices}")
    for key, value in (("input_size", input_size), ("units", units)):
        if value is None:
            raise SpecError(f"{key} is missing for {name}: pass {key}=N")
    fields: dict[str, Any] = dict(RECURRENT[storage, layer])
    if reset_after is not None or linear_before_reset is not None:
        if layer != "gru" or storage not in ("keras", "onnx"):
            raise SpecError(f"reset_after/linear_before_reset do not apply to {name}: only keras:gru and onnx:gru take them")
        flag = reset_after if reset_after is not None else linear_before_reset
        fields["reset_after"] = bool(flag)
    if storage == "keras" and layer == "gru":
        fields["summed_bias"] = not fields.get("reset_after", True)
    return RecurrentSpec(cell=layer, input_size=input_size, units=units, storage=storage,
                         bidirectional=bidirectional, name=name, **{**fields, **overrides})


def spec_from_flags(name: str, flags: dict[str, Any]) -> SequenceSpec:
    """The spec of ``name`` from command-line flags (``units``, ``input_size``, ``embed_dim``, ``heads``,
    ``head_dim``, ``kv_heads``, ``bidirectional``, ``reset_after`` as "true"/"false"), each layer taking those that apply to it."""
    layer = name.split(":")[-1] if isinstance(name, str) else ""
    keys = ("embed_dim", "heads", "head_dim", "kv_heads") if layer == "mha" else ("input_size", "units", "bidirectional")
    kwargs = {k: flags[k] for k in keys if flags.get(k) is not None}
    if flags.get("no_bias") and layer == "mha":
        kwargs["bias"] = False
    if flags.get("reset_after") is not None and name in ("keras:gru", "onnx:gru"):
        kwargs["reset_after"] = flags["reset_after"] == "true"
    return spec(name, **kwargs)


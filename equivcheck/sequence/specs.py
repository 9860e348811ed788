"""Specs of recurrent (LSTM, GRU, SimpleRNN) and multi-head attention layers.

A spec names a layer's shape and the conventions of its stored weights: which parameter
names it has (``storage``), the order its gates are stacked in, where a GRU applies its reset
gate, and whether its biases are kept apart or summed. Gates use canonical letters whatever a
framework calls them: LSTM ``i f g o`` (``g`` the cell candidate, Keras and ONNX's ``c``),
GRU ``r z n`` (``n`` the candidate, Keras and ONNX's ``h``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from equivcheck.errors import SpecError

__all__ = ["CELLS", "GATES", "AttentionSpec", "RecurrentSpec", "SequenceSpec"]

#: Canonical gate letters of each cell, in canonical order.
GATES = {"lstm": "ifgo", "gru": "rzn", "rnn": "h"}
CELLS = tuple(GATES)
RECURRENT_STORAGES = ("torch", "keras", "onnx", "flax", "tflite")
ATTENTION_STORAGES = ("torch", "keras", "flax", "gpt2", "neox", "llama", "internlm2")
# The attention storages whose layers share key/value heads between query heads (``kv_heads`` < ``heads``).
GROUPED_STORAGES = ("keras", "llama", "internlm2")
# What each storage calls the canonical gate letters, for messages.
_DISPLAY = {"keras": {"g": "c", "n": "h"}, "onnx": {"g": "c", "n": "h"}, "tflite": {"g": "c"}}


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r} is not an integer: expected a positive integer")
    if value < 1:
        raise SpecError(f"{name}={value!r} must be a positive integer")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{name}={value!r} is not a bool: pass True or False")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(f"{name}={value!r} is not valid: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class RecurrentSpec:
    """An LSTM, GRU or SimpleRNN layer reading ``(batch, time, input_size)``, zero initial state.

    ``storage`` picks the parameter names and kernel orientation (torch ``weight_ih_l0``
    (gates·units, in); Keras ``kernel`` (in, gates·units); ONNX ``W`` (dirs, gates·units, in);
    Flax one Dense per gate; TFLite one (units, in) matrix per gate, named as its fused op's
    inputs). ``gate_order`` is the stacking order in canonical letters.
    ``reset_after`` (GRU): the reset gate multiplies the recurrent matmul's result (torch,
    Keras ``reset_after=True``, ONNX ``linear_before_reset=1``) rather than the state before it.
    ``summed_bias``: one bias holding input + recurrent bias (Keras LSTM, Keras GRU
    ``reset_after=False``) instead of two.
    """

    cell: str
    input_size: int
    units: int
    storage: str = "torch"
    gate_order: str | None = None
    bidirectional: bool = False
    reset_after: bool = True
    summed_bias: bool = False
    name: str = field(default="", compare=False)

    kind = "recurrent"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _choice("cell", self.cell, CELLS)
        _count("input_size", self.input_size)
        _count("units", self.units)
        _choice("storage", self.storage, RECURRENT_STORAGES)
        gates = GATES[self.cell]
        order = gates if self.gate_order is None else self.gate_order
        if not isinstance(order, str) or sorted(order) != sorted(gates):
            raise SpecError(f"gate_order={self.gate_order!r} is not an order of the {self.cell} gates: "
                            f"expected a permutation of {gates!r} (canonical letters)")
        set_(self, "gate_order", order)
        for flag in ("bidirectional", "reset_after", "summed_bias"):
            _flag(flag, getattr(self, flag))
        if self.cell != "gru" and not self.reset_after:
            raise SpecError(f"reset_after=False applies to GRU layers only (cell={self.cell!r}): leave it True")
        if self.cell == "gru" and self.reset_after and self.summed_bias:
            raise SpecError("summed_bias=True with reset_after=True: a GRU that resets after the recurrent matmul "
                            "needs its recurrent bias apart; pass summed_bias=False")
        if self.storage == "flax" and (self.bidirectional or self.cell != "lstm"):
            raise SpecError(f"storage='flax' covers the unidirectional LSTMCell only (cell={self.cell!r}, "
                            f"bidirectional={self.bidirectional})")
        if self.storage == "flax" and not self.summed_bias:
            raise SpecError("storage='flax' keeps one bias (on the recurrent Dense): pass summed_bias=True")
        if self.storage == "tflite" and self.cell == "gru":
            raise SpecError(f"storage='tflite' has no {self.cell} layer: TFLite's runtime has no fused GRU op (the converter "
                            "lowers a GRU to a WHILE loop of builtin ops, its weights unnamed constants); expected cell='lstm' or 'rnn'")
        if self.storage == "tflite" and not self.summed_bias:
            raise SpecError("storage='tflite' keeps one bias per gate (input + recurrent summed): pass summed_bias=True")

    @property
    def gates(self) -> int:
        return len(GATES[self.cell])

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def fan_in(self) -> int:
        """Products summed into one gate pre-activation (bias included)."""
        return self.input_size + self.units + 1

    def gate_labels(self, order: str | None = None) -> str:
        """``order`` (default: this spec's) in this storage's own letters: ``"i,f,c,o"``."""
        names = _DISPLAY.get(self.storage, {})
        return ",".join(names.get(g, g) for g in (order or self.gate_order))

    def replace(self, **changes: Any) -> RecurrentSpec:
        return _replace(self, changes)

    def describe(self) -> str:
        extra = ", bidirectional" if self.bidirectional else ""
        if self.cell == "gru":
            extra += f", reset_after={self.reset_after}"
        return (f"{self.name or self.cell}(input_size={self.input_size}, units={self.units}, "
                f"gates={self.gate_labels()}{extra}, bias={'summed' if self.summed_bias else 'input+recurrent'})")


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention: ``embed_dim`` in and out, ``heads`` heads of ``head_dim``.

    ``storage`` picks the parameter names: torch ``in_proj_weight`` (3·E, E) stacked q;k;v,
    ``out_proj.weight`` (E, E); Keras and Flax a kernel (E, heads, head_dim) per projection
    and an output kernel (heads, head_dim, E); GPT-2 ``c_attn.weight`` (E, 3·E), a Conv1D
    stored (in, out); GPT-NeoX ``query_key_value.weight`` (3·E, E) interleaved per head
    (rows ordered heads, q;k;v, head_dim); Llama (Hugging Face) ``q_proj.weight`` (heads·head_dim, E),
    ``k_proj.weight``, ``v_proj.weight`` (kv_heads·head_dim, E), ``o_proj.weight`` (E, heads·head_dim);
    InternLM2 ``wqkv.weight`` (kv_heads·(group+2)·head_dim, E) per key-value group: the group's
    query heads, then its key, then its value, ``wo.weight`` (E, heads·head_dim). Scores are
    scaled by 1/√head_dim.

    ``kv_heads`` (default ``heads``; it must divide ``heads``): key and value heads, shared by
    ``group = heads // kv_heads`` query heads each; query head ``h`` reads key/value head
    ``h // group`` (grouped-query attention; ``kv_heads=1``: multi-query). Keras, Llama and
    InternLM2 storages take ``kv_heads < heads``.
    """

    embed_dim: int
    heads: int
    head_dim: int | None = None
    storage: str = "torch"
    bias: bool = True
    kv_heads: int | None = None
    name: str = field(default="", compare=False)

    kind = "attention"

    def __post_init__(self) -> None:
        _count("embed_dim", self.embed_dim)
        _count("heads", self.heads)
        _choice("storage", self.storage, ATTENTION_STORAGES)
        _flag("bias", self.bias)
        if self.head_dim is None:
            if self.embed_dim % self.heads:
                raise SpecError(f"heads={self.heads} does not divide embed_dim={self.embed_dim}: "
                                "pass head_dim= or a heads count that divides embed_dim")
            object.__setattr__(self, "head_dim", self.embed_dim // self.heads)
        _count("head_dim", self.head_dim)
        if self.storage in ("torch", "gpt2", "neox") and self.heads * self.head_dim != self.embed_dim:
            raise SpecError(f"head_dim={self.head_dim} with heads={self.heads} does not make embed_dim={self.embed_dim}: "
                            f"storage={self.storage!r} splits embed_dim into heads")
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        _count("kv_heads", self.kv_heads)
        if self.heads % self.kv_heads:
            raise SpecError(f"kv_heads={self.kv_heads} does not divide heads={self.heads}: "
                            "expected a divisor of heads (each key/value head serves heads // kv_heads query heads)")
        if self.kv_heads != self.heads and self.storage not in GROUPED_STORAGES:
            raise SpecError(f"kv_heads={self.kv_heads} with storage={self.storage!r}: its layer has one key/value head "
                            f"per query head; pass kv_heads={self.heads} or a storage of {', '.join(GROUPED_STORAGES)}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head: ``heads // kv_heads``."""
        return self.heads // self.kv_heads

    @property
    def fan_in(self) -> int:
        return self.embed_dim + 1

    def replace(self, **changes: Any) -> AttentionSpec:
        return _replace(self, changes)

    def describe(self) -> str:
        kv = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        bias = "" if self.bias else ", bias=False"
        return f"{self.name or 'mha'}(embed_dim={self.embed_dim}, heads={self.heads}, head_dim={self.head_dim}{kv}{bias})"


SequenceSpec = RecurrentSpec | AttentionSpec


def _replace(spec: Any, changes: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(spec)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise SpecError(f"{type(spec).__name__} has no field {unknown[0]!r}: expected one of {', '.join(sorted(known))}")
    return dataclasses.replace(spec, **changes)

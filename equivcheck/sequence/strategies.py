"""Hypothesis strategies for recurrent and attention spec pairs that have a mapping.

Keyword-only ``min_*``/``max_*`` arguments, checked when called; shrinking goes toward the
smallest sizes and the first presets.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from equivcheck.errors import SpecError
from equivcheck.sequence.presets import ATTENTION, RECURRENT, spec
from equivcheck.sequence.specs import SequenceSpec

__all__ = ["attention_pairs", "recurrent_pairs"]


def _range(name: str, lo: Any, hi: Any) -> tuple[int, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
        raise SpecError(f"min_{name}={lo!r}, max_{name}={hi!r} are not a range: expected integers 1 <= min <= max")
    return lo, hi


def _variants(storage: str, cell: str) -> list[dict[str, Any]]:
    """The presets' keyword variants: both reset placements of Keras and ONNX GRUs."""
    return [{"reset_after": True}, {"reset_after": False}] if cell == "gru" and storage in ("keras", "onnx") else [{}]


def recurrent_pairs(*, cells: tuple[str, ...] = ("lstm", "gru", "rnn"), min_input_size: int = 1, max_input_size: int = 8,
                    min_units: int = 1, max_units: int = 8) -> st.SearchStrategy[tuple[SequenceSpec, SequenceSpec]]:
    """(source, target) recurrent preset specs of one cell, size and reset placement."""
    ins, units = _range("input_size", min_input_size, max_input_size), _range("units", min_units, max_units)
    unknown = set(cells) - {cell for _, cell in RECURRENT}
    if not cells or unknown:
        raise SpecError(f"cells={cells!r} is not valid: expected some of lstm, gru, rnn")

    @st.composite
    def pairs(draw: st.DrawFn) -> tuple[SequenceSpec, SequenceSpec]:
        cell = draw(st.sampled_from(cells))
        size = dict(input_size=draw(st.integers(*ins)), units=draw(st.integers(*units)))
        names = [(s, kw) for s, c in RECURRENT if c == cell for kw in _variants(s, c)]
        bidirectional = draw(st.booleans())
        if bidirectional:
            names = [(s, kw) for s, kw in names if s != "flax"]
        reset = draw(st.booleans())
        names = [(s, kw) for s, kw in names if cell != "gru" or kw.get("reset_after", True) == reset]
        (a, ka), (b, kb) = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        return (spec(f"{a}:{cell}", bidirectional=bidirectional, **size, **ka),
                spec(f"{b}:{cell}", bidirectional=bidirectional, **size, **kb))

    return pairs()


def attention_pairs(*, min_heads: int = 1, max_heads: int = 4, min_head_dim: int = 1,
                    max_head_dim: int = 4) -> st.SearchStrategy[tuple[SequenceSpec, SequenceSpec]]:
    """(source, target) attention preset specs with ``embed_dim = heads · head_dim``."""
    heads, dims = _range("heads", min_heads, max_heads), _range("head_dim", min_head_dim, max_head_dim)

    @st.composite
    def pairs(draw: st.DrawFn) -> tuple[SequenceSpec, SequenceSpec]:
        n, d = draw(st.integers(*heads)), draw(st.integers(*dims))
        a, b = draw(st.sampled_from(ATTENTION)), draw(st.sampled_from(ATTENTION))
        return spec(f"{a}:mha", embed_dim=n * d, heads=n), spec(f"{b}:mha", embed_dim=n * d, heads=n)

    return pairs()

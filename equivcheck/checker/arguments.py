"""Shape arguments of ``check_converter``: fixed values, ranges or hypothesis strategies, and the specs they build."""

from __future__ import annotations

from typing import Any

from equivcheck.errors import SpecError
from equivcheck.presets import build
from equivcheck.sequence.presets import is_sequence_name
from equivcheck.sequence.presets import spec as sequence_spec
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

_INT_ARGS = ("channels", "units", "groups", "multiplier")


# -- shape arguments ---------------------------------------------------------------------
def is_strategy(value: Any) -> bool:
    from hypothesis.strategies import SearchStrategy

    return isinstance(value, SearchStrategy)


def _int_range(name: str, value: Any) -> Any:
    """A fixed int, or a strategy for a ``(lo, hi)`` range, a ``range`` or a strategy."""
    from hypothesis import strategies as st

    if is_strategy(value):
        return value
    if isinstance(value, range):
        if not value:
            raise SpecError(f"{name}={value!r} is empty: expected a non-empty range")
        return st.sampled_from(value)
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or value[0] > value[1]:
            raise SpecError(f"{name}={value!r} is not a range: expected (low, high) integers with low <= high")
        return st.integers(value[0], value[1])
    return value


def _axes(name: str, value: Any) -> Any:
    """A fixed tuple, or a strategy when any axis is a range or strategy."""
    from hypothesis import strategies as st

    if is_strategy(value) or not isinstance(value, (tuple, list)):
        return value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    parts = [_int_range(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return st.tuples(*(p if is_strategy(p) else st.just(p) for p in parts))


def split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed values, strategies) of the shape arguments."""
    fixed, varying = {}, {}
    for key, value in args.items():
        v = _int_range(key, value) if key in _INT_ARGS else _axes(key, value) if key != "bias" else value
        (varying if is_strategy(v) else fixed)[key] = v
    return fixed, varying


def build_side(name: Any, args: dict[str, Any], role: str) -> LayerSpec:
    if isinstance(name, (DenseSpec, ConvSpec)):
        return name
    if not isinstance(name, str):
        raise SpecError(f"{role}={name!r} is not a layer: expected 'PRESET:LAYER' (e.g. 'keras:dense') or a spec")
    return build(name, **{k: v for k, v in args.items() if v is not None})


def sequence_pair(source: Any, target: Any, args: dict[str, Any]) -> tuple[Any, Any] | None:
    """The (source, target) recurrent or attention specs when either side names one, else None.

    ``args``: the shape arguments (``input_size``, ``units``, ``embed_dim``, ``heads``, ``head_dim``,
    ``bidirectional``, ``reset_after``); each side takes those that apply to it. Fixed values only.
    """
    sides = (source, target)
    if not any(isinstance(s, (RecurrentSpec, AttentionSpec)) or is_sequence_name(s) for s in sides):
        return None
    given = {k: v for k, v in args.items() if v is not None}
    for key, value in given.items():
        if is_strategy(value) or isinstance(value, (tuple, list, range)):
            raise SpecError(f"{key}={value!r} is a range: recurrent and attention layers are checked at fixed sizes; "
                            "pass an integer")
    out = []
    for role, side in zip(("source", "target"), sides):
        if isinstance(side, (RecurrentSpec, AttentionSpec)):
            out.append(side)
            continue
        if not is_sequence_name(side):
            raise SpecError(f"{role}={side!r} is not a recurrent or attention layer while the other side is: "
                            "expected e.g. 'torch:lstm', 'keras:gru' or 'torch:mha'")
        keys = (("embed_dim", "heads", "head_dim") if side.endswith(":mha") else
                ("input_size", "units", "bidirectional") + (("reset_after",) if side in ("keras:gru", "onnx:gru") else ()))
        out.append(sequence_spec(side, **{k: given[k] for k in keys if k in given}))
    return out[0], out[1]

"""Specs to and from plain dicts (JSON reports, CLI, the pytest plugin's workers)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from equivcheck.errors import SpecError
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec


def spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "dense" if isinstance(spec, DenseSpec) else "conv"}
    for f in fields(spec):
        value = getattr(spec, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out["kernel_shape"] = list(spec.kernel_shape)
    return out


def spec_from_dict(data: dict[str, Any]) -> LayerSpec:
    data = dict(data)
    kind = data.pop("kind", None)
    data.pop("kernel_shape", None)
    cls = {"dense": DenseSpec, "conv": ConvSpec}.get(kind)
    if cls is None:
        raise SpecError(f"kind={kind!r} is not valid: expected 'dense' or 'conv'")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise SpecError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)

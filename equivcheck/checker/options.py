"""Run-wide options and seeds, and which framework runs a layer (its preset's, else the reference, saying why)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from equivcheck.errors import EquivcheckError, SpecError
from equivcheck.presets import backend_of
from equivcheck.specs import LayerSpec


@dataclass(frozen=True)
class Options:
    """Run-wide settings (the pytest options ``--equivcheck-*``)."""

    backends: tuple[str, ...] | None = None  # frameworks allowed to run layers; None: every installed one
    max_examples: int = 20
    seed: int = 0
    dtypes: tuple[str, ...] = ("float32",)

    def __post_init__(self) -> None:
        from equivcheck.dtypes import np_dtype

        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))
        if isinstance(self.dtypes, str):
            object.__setattr__(self, "dtypes", (self.dtypes,))
        for d in self.dtypes:
            np_dtype(d)
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise SpecError(f"max_examples={self.max_examples!r} is not valid: expected a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"seed={self.seed!r} is not valid: expected a non-negative integer")

    def replace(self, **changes: Any) -> Options:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SpecError(f"option {sorted(unknown)[0]!r} is unknown: expected one of {', '.join(sorted(known))}")
        return Options(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from any values (stable across processes, unlike ``hash``)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# -- backends ----------------------------------------------------------------------------
def _installed(name: str) -> bool:
    from equivcheck import backends as registry

    if name not in registry.BACKENDS:
        return False
    try:
        return bool(registry.get(name).available())
    except (ImportError, EquivcheckError):
        return False


def resolve_backend(layer: LayerSpec, dtype: str, allowed: Sequence[str] | None = None) -> tuple[str, str]:
    """``(backend, note)``: the framework that runs ``layer`` (from its preset), else numpy with why."""
    from equivcheck import backends as registry

    name = backend_of(layer)
    if name == "numpy":
        return name, ""
    if allowed is not None and name not in allowed:
        return "numpy", f"{layer.name} ran on numpy: backend {name!r} is not among the allowed backends ({', '.join(allowed)})"
    if not _installed(name):
        return "numpy", f"{layer.name} ran on numpy: backend {name!r} is not installed"
    from equivcheck.backends.probe import probe

    facts = probe(registry.get(name), layer, dtype)
    if not facts.runs:
        return "numpy", f"{layer.name} ran on numpy: {facts.reason}"
    return name, ""


# -- helpers for the pytest plugin ---------------------------------------------------------
def installed_backends() -> list[str]:
    """Names of the registered backends whose framework is installed (nothing is imported)."""
    from equivcheck import backends as registry

    return [name for name in registry.BACKENDS if _installed(name)]


def options_from(backends: Sequence[str] | None, max_examples: int | None, seed: int,
                 marker: dict[str, Any]) -> tuple[Options, dict[str, Any]]:
    """(:class:`Options`, ``spec_pairs`` defaults) from the session's settings and a test's marker options."""
    import inspect

    from equivcheck.strategies import spec_pairs

    option_names = {f.name for f in fields(Options)}
    pair_names = set(inspect.signature(spec_pairs).parameters)
    unknown = sorted(set(marker) - option_names - pair_names)
    if unknown:
        raise SpecError(
            f"equivcheck marker option {unknown[0]!r} is unknown: expected one of "
            f"{', '.join(sorted(option_names | pair_names))}"
        )
    base = Options(backends=tuple(backends) if backends else None, max_examples=max_examples or 20, seed=seed)
    changes = {k: v for k, v in marker.items() if k in option_names}
    if isinstance(changes.get("backends"), str):
        changes["backends"] = tuple(b for b in changes["backends"].split(",") if b)
    return base.replace(**changes), {k: v for k, v in marker.items() if k in pair_names}

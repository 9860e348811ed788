"""Verify a conversion on real layers: spec pair + converter + backends → :class:`Case`.

A thin face over :func:`equivcheck.judge.judge_pair`, which draws the data from the probed facts,
runs both real layers, compares them with the exact result and rejects every mutant on the
same data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from equivcheck.data import sample_inputs, sample_weights
from equivcheck.errors import SpecError, renamed
from equivcheck.judge import Case, Converter, MutationOutcome, from_layout, input_spec, judge_pair, to_layout
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec
from equivcheck.specs import LayerSpec

SEQUENCE_SPECS = (RecurrentSpec, AttentionSpec)

__all__ = ["Case", "MutationOutcome", "draw", "from_layout", "input_spec", "to_layout", "verify", "verify_pair"]


def draw(spec: LayerSpec, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Random kernel and bias for ``spec``, rounded to ``dtype``: see :func:`equivcheck.data.sample_weights`."""
    return sample_weights(spec, dtype, rng)


def canonical_input(spec: LayerSpec, batch: int | None, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Inputs ``(batch, channels, *spatial)``: see :func:`equivcheck.data.sample_inputs`."""
    return sample_inputs(spec, batch, dtype, rng)


def verify_pair(
    source: LayerSpec,
    target: LayerSpec,
    *,
    source_backend: str = "numpy",
    target_backend: str = "numpy",
    dtype: str = "float32",
    converter: Converter | None = None,
    seed: int = 0,
    batch: int | None = None,
    mutants: bool = True,
    tf32: bool = False,
    data: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None = None,
    mutations: bool | None = None,
) -> Case:
    """Check one conversion on one backend pair; never raises for a failed check, only for bad arguments.

    ``mutants``: also check that each plausible wrong conversion (:mod:`equivcheck.mutations`)
    is rejected on the same data (``mutations=`` is its deprecated name).
    ``data`` = ``(kernel, bias, x)`` replaces the drawn data: source weights in ``dtype`` and an
    input batch ``(batch, channels, *spatial)`` (see :func:`equivcheck.data.sample_inputs`).
    By default the data are drawn from ``seed`` at the density the backends' probed sums allow
    (:func:`equivcheck.judge.draw_data`).

    Recurrent and attention specs (``ec.spec("torch:lstm", input_size=32, units=64)``) go to
    :func:`equivcheck.sequence.verify.verify_sequence_pair`: ``converter(weights) -> weights`` on dicts
    of named tensors; each backend is the layer's own framework or ``"numpy"`` (the reference), any
    other gives a ``skip``.
    """
    if mutations is not None:
        mutants = renamed("mutations", "mutants", mutations)
    if isinstance(source, SEQUENCE_SPECS) or isinstance(target, SEQUENCE_SPECS):  # recurrent and attention layers
        from equivcheck.sequence.verify import verify_sequence_pair

        if data is not None or tf32:
            raise SpecError("data= and tf32= do not apply to recurrent or attention layers: leave them out")
        return verify_sequence_pair(source, target, source_backend=source_backend, target_backend=target_backend,
                                    dtype=dtype, converter=converter, seed=seed, batch=batch, mutants=mutants)
    return judge_pair(source, target, source_backend=source_backend, target_backend=target_backend, dtype=dtype,
                      converter=converter, seed=seed, batch=batch, mutants=mutants, tf32=tf32, data=data)


def verify(
    source: LayerSpec,
    target: LayerSpec,
    *,
    backends: Sequence[str] | Sequence[tuple[str, str]] = ("numpy",),
    dtypes: Sequence[str] = ("float32",),
    converter: Converter | None = None,
    seed: int = 0,
    batch: int | None = None,
    mutants: bool = True,
    mutations: bool | None = None,
) -> list[Case]:
    """Check a conversion on every ordered pair of ``backends`` (or the given pairs) and dtype."""
    if mutations is not None:
        mutants = renamed("mutations", "mutants", mutations)
    pairs = [p if isinstance(p, tuple) else None for p in backends]
    if any(p is None for p in pairs):
        names = list(backends)
        pairs = [(a, b) for a in names for b in names]
    return [
        verify_pair(source, target, source_backend=a, target_backend=b, dtype=dt, converter=converter,
                    seed=seed, batch=batch, mutants=mutants)
        for dt in dtypes
        for a, b in pairs
    ]

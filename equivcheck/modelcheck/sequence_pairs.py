"""Recurrent and attention layers as checked pairs: torch ``nn.LSTM``/``GRU``/``RNN`` and
``nn.MultiheadAttention``, Keras 3 ``LSTM``/``GRU``/``SimpleRNN`` and ``MultiHeadAttention``.

Each side's layer is captured as a record holding its spec, named weights and ``(batch, time,
features)`` inputs (:mod:`equivcheck.modelcheck.sequence_capture`). A converted layer is replayed alone on its partner's
captured input, on a real layer built from its spec (:mod:`equivcheck.sequence.backends`), and
judged as :func:`~equivcheck.sequence.verify.verify_sequence_pair` judges a pair: each side
against the float64 reference of the *source's* spec and weights on that input, under its own
bound (dtype, fan-in and recurrence depth; the converted side's never below the source's:
:func:`~equivcheck.sequence.verify.judgement_bounds`), a mutant rejected where its exact output
lands more than its own bound plus the converted side's from the exact one. A failing pair is
named from the weights (:func:`~equivcheck.sequence.verify.identify`).

Sequence in, sequence out, zero initial state; bidirectional layers (torch ``bidirectional=True``,
Keras ``Bidirectional(...)`` concatenating) as one spec, a direction order mistake named. A torch
layer of ``num_layers=N`` (uni- or bidirectional, dropout between its layers off in eval mode) is
N pairs, ``lstm[0]`` … ``lstm[N-1]``, one per stacked layer, each on its own input (the previous
layer's output sequence) and paired with one of N stacked Keras layers (``return_sequences=True``;
the last may return its last step), either way: a mistake in one layer is named at that layer, and
the right mapping names the torch weights of that layer (``weight_ih_l1``…).
Attention masks (torch ``key_padding_mask``/``attn_mask``/``is_causal``, Keras ``attention_mask``,
``use_causal_mask`` and the query/value Keras masks) are captured as one (batch, query, key)
mask: a converted layer whose mask differs fails ("attention mask", an inverted one named); a
mask that cannot be captured, or a query that may attend to nothing, makes the row
``inconclusive``, never ``pass``. A Keras layer returning its last step only pairs too: its own last
step is judged against the exact one, its partner's whole sequence against the exact sequence.
Layers outside what a spec describes (a projection, an initial state, key/value sizes other than
the embedding, activations other than the defaults, dropout between stacked layers in training
mode) are not recorded: they stay unchecked, named, with the reason.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.layers import Linear
from equivcheck.modelcheck.result import LayerRow
from equivcheck.modelcheck.sequence_capture import SEQUENCE_KINDS

__all__ = ["SEQUENCE_KINDS", "check_sequence_pair"]


# -- the check ---------------------------------------------------------------------------------
def _inputs(record: Linear) -> Any:
    ins = record.config["inputs"]
    return tuple(np.asarray(a, np.float64) for a in ins) if record.kind == "mha" else np.asarray(ins[0], np.float64)


def _relative(a: Any, b: Any) -> float:
    parts_a = a if isinstance(a, tuple) else (a,)
    parts_b = b if isinstance(b, tuple) else (b,)
    worst = 0.0
    for x, y in zip(parts_a, parts_b):
        if x.shape != y.shape or not np.all(np.isfinite(x)):
            return math.inf
        scale = float(np.max(np.abs(y), initial=0.0))
        err = float(np.max(np.abs(x - y), initial=0.0))
        worst = max(worst, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return worst


def _replay(spec: Any, weights: dict[str, Any], inputs: Any, dtype: str, mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, str]:
    """The layer of ``spec`` with ``weights`` on ``inputs`` on its framework's real layer (numpy where that is missing).
    ``mask`` (batch, query, key), True where a query may attend: the batch run in groups sharing one mask, as every
    framework's layer takes a (query, key) mask."""
    from equivcheck.sequence.backends import run
    from equivcheck.sequence.verify import resolve_backend

    backend, note = resolve_backend(spec, dtype)
    if mask is None:
        return run(backend, spec, weights, inputs, dtype=dtype), note
    if backend not in ("numpy", "torch", "keras", "flax"):
        raise EquivcheckError(f"a masked {spec.describe()} cannot be replayed on {backend}: it takes no mask")
    out: np.ndarray | None = None
    groups: dict[bytes, list[int]] = {}
    for b in range(len(mask)):
        groups.setdefault(np.packbits(mask[b]).tobytes(), []).append(b)
    for rows in groups.values():
        y = run(backend, spec, weights, tuple(a[rows] for a in inputs), dtype=dtype, mask=mask[rows[0]])
        if out is None:
            out = np.empty((len(mask), *y.shape[1:]))
        out[rows] = y
    assert out is not None
    return out, note


def _mask(record: Linear) -> np.ndarray | None:
    """A record's attention mask as the reference reads it: (batch, 1 head, query, key); None when unmasked."""
    m = record.config.get("mask")
    return None if m is None else np.asarray(m, bool)[:, None]


def _mask_differs(ms: np.ndarray | None, mc: np.ndarray | None, shape: tuple[int, ...]) -> str:
    """Why the converted layer's mask is not the source's, or ""."""
    a = np.ones(shape, bool) if ms is None else np.broadcast_to(ms, shape)
    b = np.ones(shape, bool) if mc is None else np.broadcast_to(mc, shape) if mc.shape[1:] == shape[1:] else None
    if b is None:
        return f"the converted layer's attention mask has shape {mc.shape}, the source's {shape}"
    if np.array_equal(a, b):
        return ""
    if mc is None:
        return "the converted layer is called without the source's attention mask"
    if ms is None:
        return "the converted layer is called with an attention mask the source does not have"
    if not np.any(a & b):
        return ("attention mask inverted: no (query, key) pair the source may attend is allowed in the converted layer "
                "(torch's boolean masks are True where a query may not attend, Keras' where it may)")
    return (f"the converted layer's attention mask differs from the source's at {int(np.count_nonzero(a != b))} "
            f"of {a.size} (query, key) positions")


def check_sequence_pair(s: Linear, c: Linear, dtype: str, failed_before: bool, mutants: bool, seed: int = 0, *,
                        boundary: float = 1e-3) -> LayerRow:
    """A recurrent or attention pair: the converted layer alone on the source's captured input, against the source's
    captured output; a failure named from the weights. ``boundary``: the largest relative difference at which the
    two captured inputs still count as the same."""
    from equivcheck.sequence import reference
    from equivcheck.sequence.named import convert, plan
    from equivcheck.sequence.verify import compare_outputs, convention_of, identify, identify_mutant, judgement_bounds

    kind = s.kind if s.kind == c.kind else f"{s.kind} → {c.kind}"
    row = LayerRow(s.name, c.name, kind, dtype, "fail")
    ss, cs = s.config["sequence"], c.config["sequence"]
    ws = {k: np.asarray(v, np.float64) for k, v in s.config["named"].items()}
    wc = {k: np.asarray(v, np.float64) for k, v in c.config["named"].items()}
    row.notes.append(f"{ss.describe()} ↔ {cs.describe()}")
    row.notes += [note for note in (_stacked_note(r, side) for side, r in (("source", s), ("converted", c))) if note]
    try:
        right = plan(ss, cs)
    except EquivcheckError as exc:
        row.mistake = "layer configuration differs"
        row.diagnosis = f"layer configuration differs: {str(exc).splitlines()[0]}"
        return row
    xs, xc = _inputs(s), _inputs(c)
    rel = _relative(xc, xs)
    row.boundary_ok = rel <= boundary
    row.boundary = "same layout (batch, time, features)" if row.boundary_ok else \
        f"values differ from the source's (max relative difference {rel:.3g})"
    unknown = [f"{side} {r.config['class']} {r.config['mask_unknown']}" for side, r in (("source", s), ("converted", c))
               if r.config.get("mask_unknown")]
    if unknown:  # replayed without its mask, the layer would differ for that alone: no verdict either way
        row.verdict = "inconclusive"
        row.notes.append(f"mask not captured ({'; '.join(unknown)}): the pair is not replayed")
        return row
    ms, mc = _mask(s), _mask(c)
    if ms is not None or mc is not None:
        rows = ms if ms is not None else mc
        assert rows is not None
        differs = _mask_differs(ms, mc, rows.shape)
        if differs:
            row.mistake, row.diagnosis = "attention mask", differs
            return row
        if not np.all(np.any(rows, axis=-1)):
            row.verdict = "inconclusive"
            row.notes.append(f"{int(np.count_nonzero(~np.any(rows, axis=-1)))} query positions may attend to no key: "
                             "their output is each framework's own (NaN in torch, the plain mean in Keras)")
            return row
        row.notes.append(f"masked: {int(np.count_nonzero(~rows))} of {rows.size} (query, key) pairs blocked, "
                         "the same in both models")
    exact, bound, bound_c = judgement_bounds(ss, cs, ws, xs, dtype, ms)  # each side under its own bound
    y_s = np.asarray(s.y, np.float64)
    exact_s, bound_s = exact, bound  # what the captured source output is judged against
    if s.config.get("last_step"):  # Keras return_sequences=False: the replay is judged against the exact sequence
        exact_s, bound_s = exact[:, -1], bound[:, -1]
        row.notes.append("the source layer returns its last step only: the converted layer's whole sequence is judged "
                         "against the exact one, the source's last step against its exact value")
    mask2 = None if ms is None else ms[:, 0]
    try:
        y_c, note = _replay(cs, wc, xs, dtype, mask2)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc).splitlines()[0], "replay"
        return row
    if note:
        row.notes.append(note)
    if y_c.shape != exact.shape or y_s.shape != exact_s.shape:
        row.mistake = "output shape"
        row.diagnosis = f"the converted layer gives outputs of shape {y_c.shape[1:]}, the source {y_s.shape[1:]}"
        return row
    fan = ss.fan_in
    own = compare_outputs(y_s, exact_s, bound_s, dtype, fan)
    row.comparison = compare_outputs(y_c, exact, bound_c, dtype, fan)
    if not row.comparison.passed:
        found = identify_mutant(ss, cs, ws, wc, dtype)
        if found is not None:
            row.mistake, row.diagnosis = convention_of(found.name), found.description
        else:
            named = identify(ss, cs, ws, wc, dtype)
            if named == "correct":
                row.mistake = "weights right, output differs"
                row.diagnosis = ("weights right, output differs: the weights are the right conversion of the source's; "
                                 "the layer computes differently (an option its spec does not describe)")
            else:
                row.mistake, row.diagnosis = "wrong weights", named
        with contextlib.suppress(EquivcheckError):
            fixed, _ = _replay(cs, convert(ss, cs, ws), xs, dtype, mask2)
            if row.mistake != "weights right, output differs" and compare_outputs(fixed, exact, bound_c, dtype, fan).passed:
                row.mapping = "; ".join(_real_names(right.code("numpy"), s, c).splitlines())
        if not own.passed:
            row.notes.append(f"the source layer's own output is not what its spec describes (error/bound "
                             f"{own.max_error_ratio:.3g})")
        if not row.boundary_ok and not failed_before:
            row.notes.append(f"input: {row.boundary}")
        return row
    if not own.passed:
        row.verdict = "inconclusive"
        row.notes.append(f"the source layer's own output is not the {ss.describe()} its parameters describe "
                         f"(error/bound {own.max_error_ratio:.3g}): the reference cannot be trusted")
        return row
    last = slice(None) if not c.config.get("last_step") else (slice(None), -1)
    if c.y.size and row.boundary_ok and c.y.shape == exact[last].shape:
        mine = compare_outputs(np.asarray(c.y, np.float64), reference.forward(cs, wc, xc, mc)[last],
                               reference.error_bound(cs, wc, xc, dtype, mc)[last], dtype, cs.fan_in)
        if not mine.passed:
            row.verdict = "inconclusive"
            row.notes.append(f"the converted layer's own output is not the {cs.describe()} its parameters describe "
                             f"(error/bound {mine.max_error_ratio:.3g}): it computes something its spec does not say")
            return row
    if row.settle_input(failed_before):
        return row
    row.verdict = "pass"
    if mutants:
        missed = _missed(ss, cs, ws, wc, xs, dtype, seed, ms, bounds=(exact, bound_c))
        if missed:
            row.verdict = "inconclusive"
            row.notes.append(f"these wrong conversions would also pass on this data: {', '.join(missed)}")
    return row


def _stacked_note(record: Linear, side: str) -> str:
    """What a record of one layer of a torch stack (``num_layers`` > 1) is, for the row's notes; else ""."""
    if "stacked" not in record.config:
        return ""
    k, n = record.config["stacked"]
    reverse = f", *_l{k}_reverse" if any(v.endswith("_reverse") for v in record.config["names"].values()) else ""
    fed = "on the model's input" if k == 0 else f"on layer {k - 1}'s output sequence"
    return (f"{side} {record.name}: layer {k} of {record.config['class']} {record.config['module']} "
            f"(num_layers={n}; weights *_l{k}{reverse}), {fed}")


def _real_names(code: str, s: Linear, c: Linear) -> str:
    """A plan's code with the weights of a torch stack's layer under the module's names (``weight_ih_l1``, not the
    one-layer spec's ``weight_ih_l0``): ``w[...]`` the source's, ``out[...]`` the converted layer's."""
    rename = {"w": s.config.get("names", {}), "out": c.config.get("names", {})}
    return re.sub(r"\b(w|out)\['([^']*)'\]", lambda m: f"{m[1]}[{rename[m[1]].get(m[2], m[2])!r}]", code)


def _missed(ss: Any, cs: Any, ws: dict[str, np.ndarray], wc: dict[str, np.ndarray], xs: Any, dtype: str,
            seed: int, mask: np.ndarray | None = None, *, bounds: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """The mutants that the captured input (under its mask) does not reject, and (where there are some) designed
    data, unmasked (the weights do not depend on the mask), does not either."""
    from equivcheck.sequence.verify import (
        DRAWS,
        LOW_PRECISION_BATCH,
        compare_outputs,
        draw,
        judge_mutants,
        judgement_bounds,
    )

    missed = [o.name for o in judge_mutants(ss, cs, ws, xs, dtype, mask, bounds=bounds) if o.outcome != "rejected"]
    if not missed:
        return []
    first = xs[0] if isinstance(xs, tuple) else xs
    low = dtype in ("float16", "bfloat16")
    batch = LOW_PRECISION_BATCH if low else max(2, len(first))
    for attempt in range(DRAWS if low else 1):  # low precision: a larger batch, redrawn, as verify_sequence_pair does
        _, designed = draw(ss, seed=seed + 1 + attempt, batch=batch, steps=max(5, first.shape[1]))
        try:
            y, _ = _replay(cs, wc, designed, dtype)
        except EquivcheckError:
            return missed
        exact, _, bound_c = judgement_bounds(ss, cs, ws, designed, dtype)
        if not compare_outputs(y, exact, bound_c, dtype, ss.fan_in).passed:
            return missed  # the captured data stays the evidence
        again = {o.name for o in judge_mutants(ss, cs, ws, designed, dtype, bounds=(exact, bound_c))
                 if o.outcome != "rejected"}
        missed = [m for m in missed if m in again]
        if not missed:
            break
    return missed

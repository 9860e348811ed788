"""Verify a recurrent or attention conversion on real layers, reject its plausible mistakes, name them.

:func:`verify_sequence_pair` draws weights and inputs that tell conventions apart (a few time
steps, gates out of saturation, heads that differ), converts, runs both layers and compares
within a bound from the dtype, the fan-in and the recurrence depth. Each mutant (a plausible
wrong conversion: gate order, reset placement, biases, orientation, q/k/v order, head layout,
direction order) must land outside that bound on the same data, else the verdict is
``inconclusive``. :func:`identify` names the mistake behind a wrong converted dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.compare import Comparison
from equivcheck.dtypes import np_dtype
from equivcheck.errors import BackendUnavailable, EquivcheckError, SpecError, VerificationError
from equivcheck.judge import Case, MutationOutcome
from equivcheck.sequence import reference
from equivcheck.sequence.backends import LOW_PRECISION, backend_of, run
from equivcheck.sequence.named import canonical, convert, from_canonical, plan, tensor_shapes
from equivcheck.sequence.specs import AttentionSpec, RecurrentSpec, SequenceSpec

__all__ = ["Mutant", "SequenceResult", "compare_outputs", "convention_of", "draw", "draw_grid", "error_bound", "failure_message",
           "identify", "identify_mutant", "judge_mutants", "judgement_bounds", "mutants", "resolve_backend", "spec_record",
           "tolerance", "verify_sequence_pair"]

#: Gate orders of the frameworks, per cell (canonical letters): torch/Keras/Flax and ONNX.
FRAMEWORK_ORDERS = {"lstm": ("ifgo", "iofg"), "gru": ("rzn", "zrn"), "rnn": ("h",)}
#: A mutant counts as rejected when, at some output element, its exact output lands more than MARGIN times the
#: right target's bound plus its own away from the exact output: no real layer within its own bound passes the judgement.
MARGIN = 1.0
#: Low precision: a larger batch, and up to this many draws, until every mutant is rejected on the reference.
LOW_PRECISION_BATCH = 32
DRAWS = 3
#: Low precision: the converted layer must also agree on this many :func:`draw_grid` draws (of this batch), where a
#: misplaced weight moves the output by far more than the rounding bound (a single swap of two weights shows there).
GRID_DRAWS = 2
GRID_BATCH = 64
#: Attention whose sums run below float32: inputs drawn at this scale. Its softmax carries a score's error
#: exponentially (a weight moves by up to e^{ε_i + max ε}), so large scores put the bound beyond any misplaced
#: weight's effect; halved inputs quarter the scores and bring it back within reach.
LOW_SUM_ATTENTION_SCALE = 0.5
#: Sums below float32: grid draws of this batch, fewer for a wide layer (batch × fan-in at most LOW_SUM_GRID_WEIGHTS).
LOW_SUM_GRID_BATCH = 1024
LOW_SUM_GRID_WEIGHTS = 1 << 16
#: Sequence backends whose dense matmul is another backend's: Flax's is JAX's.
PROBED_AS = {"flax": "jax"}
#: Draws a layer's own sums are probed on, and the share of the float32-sum bound its errors must stay within there.
SUM_PROBE_DRAWS = 6
SUM_PROBE_MARGIN = 1 / 3


@dataclass(frozen=True)
class Mutant:
    """A plausible wrong conversion: the target ``spec`` it is read by and its ``weights``."""

    name: str
    description: str
    spec: SequenceSpec
    weights: dict[str, np.ndarray] = field(repr=False, compare=False)


@dataclass
class SequenceResult(Case):
    """The judge's :class:`~equivcheck.judge.Case` for a recurrent or attention pair, with its evidence.

    ``comparison`` holds the target against the float64 reference (bound: the target's own running
    error bound, never below the source's), ``source_comparison`` the source against it, ``mutations``
    each mutant's outcome (``max_error_ratio`` > 1: rejected). ``max_error``/``bound`` are the
    worst element's; ``mutants`` the rows ``(name, description, deviation, rejected)``;
    ``message`` is ``reason``.
    """

    max_error: float = math.nan
    bound: float = math.nan
    rows: tuple[tuple[str, str, float, bool], ...] = ()

    @property
    def message(self) -> str:
        return self.reason

    @property
    def mutants(self) -> tuple[tuple[str, str, float, bool], ...]:
        return self.rows

    @property
    def rejected(self) -> int:
        return sum(r for *_, r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record with the keys of :meth:`Case.to_dict` (the specs as their fields)."""
        plan_code = None
        with contextlib.suppress(EquivcheckError):
            plan_code = {lang: plan(self.source, self.target).code(lang) for lang in ("numpy", "torch")}
        return {
            "source": spec_record(self.source), "target": spec_record(self.target),
            "source_backend": self.source_backend, "target_backend": self.target_backend, "dtype": self.dtype,
            "verdict": self.verdict, "reason": self.reason, "message": self.reason, "seed": self.seed,
            "mapping": None, "plan": plan_code,
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "source_comparison": None if self.source_comparison is None else self.source_comparison.to_dict(),
            "mutations": [m.to_dict() for m in self.mutations],
            **({"diagnosis": dict(self.diagnosis)} if self.diagnosis else {}),
            "facts": {}, "notes": list(self.notes),
            "max_error": self.max_error if math.isfinite(self.max_error) else None,
            "bound": self.bound if math.isfinite(self.bound) else None,
            "mutants": [{"name": n, "description": d, "max_error_ratio": x, "rejected": r} for n, d, x, r in self.rows],
        }


def spec_record(spec: SequenceSpec) -> dict[str, Any]:
    """A sequence spec as a JSON-ready dict: ``kind`` (recurrent/attention), its fields and parameter shapes."""
    return {"kind": spec.kind, **dataclasses.asdict(spec), "describe": spec.describe(),
            "tensor_shapes": {k: list(v) for k, v in tensor_shapes(spec).items()}}


# -- data ------------------------------------------------------------------------------------
def draw(spec: SequenceSpec, *, seed: int = 0, batch: int = 2, steps: int = 5, scale: float = 1.0
         ) -> tuple[dict[str, np.ndarray], Any]:
    """Float64 weights (spec's names) and inputs: kernels ~ N(0, 1/fan-in), biases ~ N(0, 1/4), inputs N(0, scale²).

    With these scales a gate pre-activation has a standard deviation near 0.7: no gate saturates.
    """
    if steps < 3:
        raise SpecError(f"steps={steps} is too short: recurrent kernels only matter from 3 steps on")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes(spec).items():
        is_bias = "bias" in name or name in ("B",) or name.endswith("/bias")
        std = 0.5 if is_bias else 1.0 / math.sqrt(spec.fan_in)
        weights[name] = rng.standard_normal(shape) * std
    if isinstance(spec, AttentionSpec):
        inputs: Any = tuple(scale * rng.standard_normal((batch, steps, spec.embed_dim)) for _ in range(3))
    else:
        inputs = scale * rng.standard_normal((batch, steps, spec.input_size))
    return weights, inputs


def draw_grid(spec: SequenceSpec, *, seed: int = 0, batch: int = GRID_BATCH, steps: int = 5, scale: float = 1.0
              ) -> tuple[dict[str, np.ndarray], Any]:
    """A draw on which a misplaced weight shows in low precision: weights on a coarse grid, inputs ~ N(0, 4·scale²).

    Each canonical tensor (input kernel, recurrent kernel, biases; attention projections) holds half
    exact zeros and half ±s or ±2s, with s the power of two nearest the scale of :func:`draw` (the
    recurrent kernel twice that, so the state carries it strongly): any two distinct weights differ
    by at least s, a sizable fraction of a pre-activation, and every weight is exact in float16 and
    bfloat16. A swap of two weights of :func:`draw` that differ by a few ulps hides in the rounding
    bound; here it moves the output by several bounds.
    """
    if steps < 3:
        raise SpecError(f"steps={steps} is too short: recurrent kernels only matter from 3 steps on")
    normal, inputs = draw(spec, seed=seed, batch=batch, steps=steps, scale=scale)
    rng = np.random.default_rng([seed, 1])
    mags = np.array([0.0, 0.0, 1.0, 2.0])
    grid = {}
    for name, w in canonical(spec).apply(normal).items():
        std = 0.5 if name.startswith("b") else 1.0 / math.sqrt(spec.fan_in)
        step = 2.0 ** round(math.log2(std / math.sqrt(float(np.mean(mags**2)))))
        grid[name] = rng.choice(mags, size=w.shape) * rng.choice([-1.0, 1.0], size=w.shape) * step * (
            2 if name.startswith("R") else 1) + 0.0  # + 0.0: no negative zeros
    inputs = tuple(2 * a for a in inputs) if isinstance(inputs, tuple) else 2 * inputs
    return from_canonical(spec).apply(grid), inputs


def error_bound(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, dtype: str, mask: Any = None, *,
                accumulate: str | None = None) -> np.ndarray:
    """A bound on |layer − exact| per output element in ``dtype``: :func:`equivcheck.sequence.reference.error_bound`."""
    return reference.error_bound(spec, weights, inputs, dtype, mask, accumulate=accumulate)


def tolerance(spec: SequenceSpec, weights: dict[str, Any], inputs: Any, dtype: str, mask: Any = None) -> float:
    """The largest element of :func:`error_bound`: one number for the whole output."""
    return float(error_bound(spec, weights, inputs, dtype, mask).max(initial=0.0))


# -- mutants ---------------------------------------------------------------------------------
def _labels(spec: SequenceSpec, order: str) -> str:
    return spec.gate_labels(order) if isinstance(spec, RecurrentSpec) else order


def mutants(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any]) -> list[Mutant]:
    """The plausible wrong conversions of ``weights`` from ``source`` to ``target``.

    Mutants that give the very weights of the right conversion (a bias that is zero anyway) are left out.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    right = convert(source, target, w)
    c = canonical(source).apply(w)  # the source's own bias split: "not summed" drops its recurrent bias
    out: list[Mutant] = []

    def add(name: str, description: str, canon: dict[str, np.ndarray], spec: SequenceSpec = target) -> None:
        got = from_canonical(spec).apply(canon)
        if spec == target and all(np.array_equal(got[k], right[k]) for k in right):
            return
        out.append(Mutant(name, description, spec, got))

    if isinstance(source, RecurrentSpec):
        assert isinstance(target, RecurrentSpec)
        cell, dirs = source.cell.upper(), range(source.directions)
        for order in FRAMEWORK_ORDERS[source.cell]:
            if order != source.gate_order:
                wrong = convert(source.replace(gate_order=order), target, w)
                if not all(np.array_equal(wrong[k], right[k]) for k in right):
                    out.append(Mutant(f"gate_order:{order}", f"{cell} gate order: the kernel is {_labels(source, source.gate_order)}, "
                                      f"the target reads {_labels(target, order)}", target, wrong))
        if source.cell == "gru":
            flipped = target.replace(reset_after=not target.reset_after, summed_bias=False)
            where = "before" if target.reset_after else "after"
            add("reset_placement", f"GRU reset gate applied {where} the recurrent matmul", dict(c), flipped)
        add("bias_not_summed", "biases not summed: the recurrent bias was dropped",
            {**c, **{f"b{d}": np.stack([c[f"b{d}"][0], 0 * c[f"b{d}"][1]]) for d in dirs}})
        add("bias_summed_twice", "biases summed twice: input + recurrent bias counted in both slots",
            {**c, **{f"b{d}": np.stack([c[f"b{d}"].sum(0)] * 2) for d in dirs}})
        G, H, I = source.gates, source.units, source.input_size  # noqa: E741
        add("kernel_not_transposed", "input kernel not transposed: its (gates·units, in) memory read as (in, gates·units)",
            {**c, **{f"W{d}": c[f"W{d}"].reshape(I, G, H).transpose(1, 2, 0) for d in dirs}})
        add("recurrent_not_transposed", "recurrent kernel not transposed: its (gates·units, units) memory read as (units, gates·units)",
            {**c, **{f"R{d}": c[f"R{d}"].reshape(H, G, H).transpose(1, 2, 0) for d in dirs}})
        if I == H:
            add("kernels_exchanged", "input and recurrent kernels exchanged",
                {**c, **{f"W{d}": c[f"R{d}"] for d in dirs}, **{f"R{d}": c[f"W{d}"] for d in dirs}})
        if source.bidirectional:
            add("directions_exchanged", "bidirectional direction order: the forward weights in the backward slot",
                {k: c[k[0] + str(1 - int(k[1]))] for k in c})
        return out
    assert isinstance(source, AttentionSpec)
    N, Dh, E = source.heads, source.head_dim, source.embed_dim
    if "Wq" in c:  # shared key/value heads: Wq (heads, head_dim, E), Wkv (2, kv_heads, head_dim, E), bq, bkv
        K, G = source.kv_heads, source.group
        Wq, Wkv, Wo = c["Wq"], c["Wkv"], c["Wo"]
        bq, bkv = (c["bq"], c["bkv"]) if "bq" in c else (None, None)

        def biases(q: np.ndarray | None, kv: np.ndarray | None) -> dict[str, np.ndarray]:
            return {} if bq is None else {"bq": q, "bkv": kv}

        add("qkv_order:q,v,k", "attention projections out of order: q,k,v stored, the target reads q,v,k",
            {**c, "Wkv": Wkv[::-1], **biases(bq, None if bkv is None else bkv[::-1])})
        add("heads_head_dim_exchanged", f"heads and head_dim exchanged: (heads={N}, head_dim={Dh}) read as ({Dh}, {N}), "
            f"key/value (kv_heads={K}, head_dim={Dh}) as ({Dh}, {K})",
            {**c, "Wq": Wq.reshape(Dh, N, E).transpose(1, 0, 2), "Wkv": Wkv.reshape(2, Dh, K, E).transpose(0, 2, 1, 3),
             "Wo": Wo.reshape(E, Dh, N).transpose(0, 2, 1),
             **biases(None if bq is None else bq.reshape(Dh, N).T, None if bkv is None else bkv.reshape(2, Dh, K).transpose(0, 2, 1))})
        # a layer where query head h reads key/value head h % kv_heads is this one with its query heads relabelled
        tiled = np.empty(N, dtype=int)
        tiled[[(h % K) * G + h // K for h in range(N)]] = np.arange(N)
        add("kv_sharing:tiled", f"key/value sharing read as tiled: query head h reads key/value head h % {K} "
            f"instead of h // {G}", {**c, "Wq": Wq[tiled], "Wo": Wo[:, tiled], **biases(None if bq is None else bq[tiled], bkv)})

        def grouped_as_stacked(q: np.ndarray, kv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rest = q.shape[2:]
            fused = np.concatenate([q.reshape(K, G, Dh, *rest), np.moveaxis(kv, 0, 1)], 1).reshape(-1, *rest)
            return fused[: N * Dh].reshape(N, Dh, *rest), fused[N * Dh :].reshape(2, K, Dh, *rest)

        wq, wkv = grouped_as_stacked(Wq, Wkv)
        add("interleaved_as_stacked:kv_group", f"fused q/k/v layout: per key-value group ({K}, {G} q heads;k;v, head_dim) "
            "read as stacked (q heads, k heads, v heads)",
            {**c, "Wq": wq, "Wkv": wkv, **({} if bq is None else dict(zip(("bq", "bkv"), grouped_as_stacked(bq, bkv))))})
        add("out_not_transposed", "output projection not transposed: its (E, heads·head_dim) memory read as (heads·head_dim, E)",
            {**c, "Wo": Wo.reshape(N * Dh, E).T.reshape(E, N, Dh)})
        if N * Dh == E:
            add("in_not_transposed", "input projections not transposed: each (heads·head_dim, E) memory read as (E, heads·head_dim)",
                {**c, "Wq": Wq.reshape(E, N, Dh).transpose(1, 2, 0), "Wkv": Wkv.reshape(2, E, K, Dh).transpose(0, 2, 3, 1)})
        return out
    has_bias = "bin" in c
    for perm in itertools.permutations(range(3)):
        if perm != (0, 1, 2):
            names = ",".join("qkv"[p] for p in perm)
            canon = {**c, "Win": c["Win"][list(perm)], **({"bin": c["bin"][list(perm)]} if has_bias else {})}
            add(f"qkv_order:{names}", f"attention projections out of order: q,k,v stored, the target reads {names}", canon)
    add("heads_head_dim_exchanged", f"heads and head_dim exchanged: (heads={N}, head_dim={Dh}) read as ({Dh}, {N})",
        {**c, "Win": c["Win"].reshape(3, Dh, N, E).transpose(0, 2, 1, 3), "Wo": c["Wo"].reshape(E, Dh, N).transpose(0, 2, 1),
         **({"bin": c["bin"].reshape(3, Dh, N).transpose(0, 2, 1)} if has_bias else {})})
    add("interleaved_as_stacked", "fused q/k/v layout: per-head interleaved (heads, 3, head_dim) read as stacked (3, heads, head_dim)",
        {**c, "Win": c["Win"].reshape(N, 3, Dh, E).transpose(1, 0, 2, 3),
         **({"bin": c["bin"].reshape(N, 3, Dh).transpose(1, 0, 2)} if has_bias else {})})
    add("out_not_transposed", "output projection not transposed: its (E, heads·head_dim) memory read as (heads·head_dim, E)",
        {**c, "Wo": c["Wo"].reshape(N * Dh, E).T.reshape(E, N, Dh)})
    if N * Dh == E:
        add("in_not_transposed", "input projections not transposed: each (heads·head_dim, E) memory read as (E, heads·head_dim)",
            {**c, "Win": c["Win"].reshape(3, E, N, Dh).transpose(0, 2, 3, 1)})
    return out


# -- identify --------------------------------------------------------------------------------
def _same(a: dict[str, Any], b: dict[str, Any], tol: float = 2.0**-20) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(y).max(initial=0)))):
            return False
    return True


def _tolerance_of(dtype: str) -> float:
    """How far two conversions may differ and still be the same one: a converter sums biases in ``dtype``."""
    return max(2.0**-20, 4 * reference.UNIT_ROUNDOFF.get(dtype, 0.0))


def identify_mutant(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any],
                    converted: dict[str, Any], dtype: str = "float64") -> Mutant | None:
    """The mutant whose weights ``converted`` are (computed in ``dtype``), or None (also for the right conversion)."""
    for m in mutants(source, target, weights):
        if m.spec == target and _same(m.weights, converted, _tolerance_of(dtype)):
            return m
    return None


def identify(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any], converted: dict[str, Any],
             dtype: str = "float64") -> str:
    """Which conversion ``converted`` is (computed in ``dtype``), from the weights alone: ``"correct"``, a
    mutant's description, or a line saying it matches none of them."""
    if _same(convert(source, target, weights), converted, _tolerance_of(dtype)):
        return "correct"
    m = identify_mutant(source, target, weights, converted, dtype)
    if m is not None:
        return m.description
    return "not a known conversion: no gate order, bias, orientation or head layout mistake explains these weights"


def convention_of(mutant_name: str) -> str:
    """The convention a mutant gets wrong, for a report's column: ``"gate order"``, ``"q/k/v order"``…"""
    head = mutant_name.split(":")[0]
    return {"gate_order": "gate order", "reset_placement": "reset placement", "bias_not_summed": "bias",
            "bias_summed_twice": "bias", "kernel_not_transposed": "kernel orientation",
            "recurrent_not_transposed": "kernel orientation", "kernels_exchanged": "kernel names",
            "directions_exchanged": "direction order", "qkv_order": "q/k/v order", "heads_head_dim_exchanged": "head layout",
            "interleaved_as_stacked": "head layout", "kv_sharing": "head layout", "out_not_transposed": "kernel orientation",
            "in_not_transposed": "kernel orientation"}.get(head, head)


# -- verify ----------------------------------------------------------------------------------
def _accumulation(layers: tuple[tuple[str, SequenceSpec], ...], dtype: str) -> str:
    """The precision the sums of these ``(backend, spec)`` layers run in: as the backends' probes found it for a
    dense layer (the widest of them), the dtype itself where a probe cannot tell; float32 where the dense answer is
    below it but every layer itself fits float32 sums (:func:`_sums_fit_float32`)."""
    if dtype in ("float32", "float64"):
        return dtype
    found = []
    for name, _ in layers:
        if name == "numpy":
            continue
        try:
            from equivcheck.backends.probe import layer_kinds, probe

            probed = PROBED_AS.get(name, name)
            facts = probe(probed, layer_kinds(probed)["dense"], dtype)
        except (EquivcheckError, KeyError, ImportError):
            return dtype
        if not (facts.runs and facts.decided and facts.accumulate in reference.UNIT_ROUNDOFF):
            return dtype
        found.append(facts.accumulate)
    widest = max(found, key=reference.UNIT_ROUNDOFF.__getitem__, default="float64")
    if low_sums(widest) and all(name == "numpy" or _sums_fit_float32(name, spec, dtype) for name, spec in layers):
        return "float32"
    return widest


@functools.cache
def _sums_fit_float32(backend: str, spec: SequenceSpec, dtype: str) -> bool:
    """Whether the real layer's errors in ``dtype`` stay within :data:`SUM_PROBE_MARGIN` of the float32-sum bound on
    :data:`SUM_PROBE_DRAWS` draws (grid draws among them): its sums run in float32 though the backend's dense
    matmul sums lower (TensorFlow without oneDNN sums a bfloat16 ``MatMul`` in bfloat16, its attention's einsums
    in float32). Measured once per process, per layer and dtype; ``False`` where the layer does not run."""
    worst = 0.0
    for i in range(SUM_PROBE_DRAWS):
        make = draw_grid if i % 2 else draw
        weights, inputs = _in_dtype(make(spec, seed=10_000 + i, batch=LOW_PRECISION_BATCH), dtype)
        try:
            y = run(backend, spec, weights, inputs, dtype=dtype)
        except EquivcheckError:
            return False
        exact = reference.forward(spec, weights, inputs)
        bound = reference.error_bound(spec, weights, inputs, dtype, accumulate="float32")
        worst = max(worst, _comparison(y, exact, bound, dtype, "float32", spec.fan_in).max_error_ratio)
    return worst <= SUM_PROBE_MARGIN


def low_sums(accumulate: str) -> bool:
    """Whether sums in ``accumulate`` run below float32 (bfloat16 or float16 sums)."""
    return reference.UNIT_ROUNDOFF[accumulate] > reference.UNIT_ROUNDOFF["float32"]


def _rounded(a: Any, dtype: str) -> Any:
    if isinstance(a, tuple):
        return tuple(_rounded(x, dtype) for x in a)
    return np.asarray(a, dtype=np_dtype(dtype)).astype(np.float64)


def _in_dtype(drawn: tuple[dict[str, np.ndarray], Any], dtype: str) -> tuple[dict[str, np.ndarray], Any]:
    """A draw's weights and inputs rounded to ``dtype`` (held in float64): exact in the dtype the layers run in."""
    weights, inputs = drawn
    return {k: _rounded(v, dtype) for k, v in weights.items()}, _rounded(inputs, dtype)


def _comparison(y: np.ndarray, ref: np.ndarray, bound: np.ndarray, dtype: str, accumulate: str, fan_in: int) -> Comparison:
    finite = np.isfinite(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(finite, np.abs(y - ref), np.inf)
        ratio = np.where(err == 0, 0.0, err / bound)
        rel = np.where(ref != 0, err / np.abs(ref), np.where(err > 0, np.inf, 0.0))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    out = int(np.count_nonzero(~(ratio <= 1.0)))
    return Comparison(passed=out == 0, dtype=dtype, accumulate=accumulate, fan_in=int(fan_in), max_abs_error=float(err.max()),
                      max_rel_error=float(rel.max()), max_error_ratio=float(ratio[worst]), bound_at_worst=float(bound[worst]),
                      worst_index=tuple(int(i) for i in worst), fraction_out_of_bound=out / ratio.size,
                      nonfinite=int(ratio.size - np.count_nonzero(finite)), elements=int(ratio.size))


def _judge_mutants(source: SequenceSpec, target: SequenceSpec, weights: dict[str, np.ndarray], inputs: Any, mask: Any,
                   exact: np.ndarray, beyond: np.ndarray, dtype: str, accumulate: str) -> list[MutationOutcome]:
    """Each mutant, judged in float64 on the reference: rejected where its exact output lands more than its own bound
    plus ``beyond`` (how far from ``exact`` a passing run may be) from ``exact``: no run within its bound passes."""
    out = []
    for m in mutants(source, target, weights):
        y = reference.forward(m.spec, m.weights, inputs, mask)
        if y.shape != exact.shape:
            ratio = math.inf
        else:
            own = reference.error_bound(m.spec, m.weights, inputs, dtype, mask, accumulate=accumulate)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = float(np.nan_to_num(np.abs(y - exact) / (MARGIN * (beyond + own)), nan=0.0).max(initial=0.0))
        out.append(MutationOutcome(m.name, m.description, "rejected" if ratio > 1 else "not rejected", ratio,
                                   convention=convention_of(m.name)))
    return out


def compare_outputs(y: Any, ref: Any, bound: Any, dtype: str, fan_in: int, accumulate: str | None = None) -> Comparison:
    """``y`` against ``ref`` under ``bound`` per element (the judgement of :func:`verify_sequence_pair`)."""
    return _comparison(np.asarray(y, np.float64), np.asarray(ref, np.float64), np.asarray(bound, np.float64), dtype,
                       accumulate or dtype, fan_in)


def judgement_bounds(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any], inputs: Any, dtype: str,
                     mask: Any = None, accumulate: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a run of the pair on ``inputs`` is judged against: ``(exact, bound, bound_t)``, the float64 reference
    output of ``source`` with ``weights``, the source's own bound and the target's (its own bound on the right
    conversion, never below the source's). A source run passes within ``bound`` of ``exact``, a target run within
    ``bound_t``; a mutant is rejected beyond ``bound_t`` plus its own (:func:`judge_mutants`)."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    acc = accumulate or dtype
    bound = reference.error_bound(source, w, inputs, dtype, mask, accumulate=acc)
    own = reference.error_bound(target, convert(source, target, w), inputs, dtype, mask, accumulate=acc)
    return reference.forward(source, w, inputs, mask), bound, np.maximum(bound, own)


def judge_mutants(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any], inputs: Any, dtype: str,
                  mask: Any = None, accumulate: str | None = None, *,
                  bounds: tuple[np.ndarray, np.ndarray] | None = None) -> list[MutationOutcome]:
    """Each mutant of ``weights`` (source to target), judged on ``inputs`` against the float64 reference as
    :func:`verify_sequence_pair` judges it: rejected where its exact output lands more than its own bound plus the
    target's (:func:`judgement_bounds`) from the exact output, where no target run within its bound is.
    ``bounds``: ``(exact, bound_t)`` of :func:`judgement_bounds` on these weights, inputs and mask, where the caller
    has them already."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    x = _rounded(inputs, "float64")
    acc = accumulate or dtype
    exact, bound_t = bounds if bounds is not None else judgement_bounds(source, target, w, x, dtype, mask, acc)[::2]
    return _judge_mutants(source, target, w, x, mask, exact, bound_t, dtype, acc)


def _check_converted(target: SequenceSpec, converted: Any) -> dict[str, np.ndarray]:
    """The converter's result as float64 arrays under ``target``'s names and shapes, else VerificationError."""
    if not isinstance(converted, dict):
        raise VerificationError(f"converter returned {type(converted).__name__}: expected a dict of tensors keyed by "
                                f"{target.describe()}'s parameter names {sorted(tensor_shapes(target))}")
    expected = tensor_shapes(target)
    if set(converted) != set(expected):
        missing, extra = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
        raise VerificationError(f"converter returned keys missing={missing} extra={extra}: "
                                f"{target.describe()} expects {sorted(expected)}")
    out = {}
    for k, v in converted.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().double().numpy()
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise VerificationError(f"converter returned {k!r} that is not an array ({type(v).__name__}): {exc}") from None
        if a.shape != tuple(expected[k]):
            raise VerificationError(f"converter returned {k!r} of shape={a.shape}: {target.describe()} expects {tuple(expected[k])}")
        out[k] = a
    return out


def verify_sequence_pair(source: SequenceSpec, target: SequenceSpec, *, source_backend: str | None = None,
                         target_backend: str | None = None, dtype: str = "float32",
                         converter: Callable[[dict[str, Any]], dict[str, Any]] | None = None, seed: int = 0,
                         steps: int = 5, batch: int | None = None, mask: Any = None, mutants: bool = True) -> SequenceResult:
    """Convert drawn weights (with ``converter``, else :func:`equivcheck.convert`), run both layers, judge: a
    :class:`SequenceResult` (a :class:`~equivcheck.judge.Case`); raises only for bad arguments.

    ``pass``: each layer is within its bound of the float64 reference (per element, a running error
    analysis from the dtype, the fan-in and the recurrence: :func:`error_bound`) and every mutant is rejected;
    ``inconclusive``: they agree but some mutant would pass too, or the source itself is out of
    its bound; ``fail``: they disagree (the reason names the mistake when :func:`identify` recognises
    it); ``skip``: a layer does not run here (not installed, or not in this dtype).
    In float16/bfloat16 the batch is larger and the data are redrawn (up to ``DRAWS`` times) until
    the reference rejects every mutant, and the layers must agree on ``GRID_DRAWS`` :func:`draw_grid`
    draws too, where a single misplaced weight shows above the rounding; a mutant rejected on a grid
    draw counts as rejected (a converter making that mistake fails there). Where the sums run below
    float32 (as probed) both counts double, the grid batch grows to ``LOW_SUM_GRID_BATCH`` and attention draws
    its inputs at ``LOW_SUM_ATTENTION_SCALE``.
    """
    np_dtype(dtype)
    low = dtype in ("float16", "bfloat16")
    plan(source, target)  # a pair no conversion makes equivalent is an error, not a failure
    source_backend = source_backend or backend_of(source)
    target_backend = target_backend or backend_of(target)
    case = SequenceResult(source, target, source_backend, target_backend, dtype, "error", seed=seed)
    for name, layer in ((source_backend, source), (target_backend, target)):
        if name not in ("numpy", backend_of(layer)):
            case.verdict = "skip"
            case.reason = f"{name} does not run {layer.name or layer.describe()} (its layers run on {backend_of(layer)} or numpy)"
            return case
        if low and name not in LOW_PRECISION:
            case.verdict, case.reason = "skip", f"{name} does not run recurrent or attention layers in {dtype} here"
            return case
    accumulate = _accumulation(((source_backend, source), (target_backend, target)), dtype)
    n = batch or (LOW_PRECISION_BATCH if low else 2)
    short = low_sums(accumulate)  # sums below float32: more and larger draws
    more = 2 if short else 1
    scale = LOW_SUM_ATTENTION_SCALE if isinstance(source, AttentionSpec) and short else 1.0

    def bounds(weights: dict[str, np.ndarray], inputs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return judgement_bounds(source, target, weights, inputs, dtype, mask, accumulate)

    for attempt in range(DRAWS * more if low and mutants else 1):
        weights, inputs = _in_dtype(draw(source, seed=seed + attempt, batch=n, steps=steps, scale=scale), dtype)
        exact, bound, bound_t = bounds(weights, inputs)
        outcomes = _judge_mutants(source, target, weights, inputs, mask, exact, bound_t, dtype, accumulate) if mutants else []
        if all(o.outcome == "rejected" for o in outcomes):
            break
    if attempt:
        case.notes.append(f"data drawn {attempt + 1} times (seeds {seed}..{seed + attempt}) for the mutants to be rejected")
    draws = [("", weights, inputs, exact, bound, bound_t)]
    grid_batch = max(n, GRID_BATCH)
    if short:  # more samples: a misplaced weight's largest effect grows, the rounding bound does not
        grid_batch = max(grid_batch, min(LOW_SUM_GRID_BATCH, LOW_SUM_GRID_WEIGHTS // max(1, source.fan_in)))
    for j in range(GRID_DRAWS * more if low else 0):  # where a misplaced weight shows above the rounding
        w, x = _in_dtype(draw_grid(source, seed=seed + j, batch=grid_batch, steps=steps, scale=scale), dtype)
        draws.append((f" on grid draw {j + 1} (draw_grid seed={seed + j})", w, x, *bounds(w, x)))
    for _, w, x, exact_g, _, bound_g in draws[1:]:  # the layers must agree there too: a mutant rejected there fails
        if all(o.outcome == "rejected" for o in outcomes):
            break
        again = {g.name: g for g in _judge_mutants(source, target, w, x, mask, exact_g, bound_g, dtype, accumulate)
                 if g.outcome == "rejected"}
        outcomes = [o if o.outcome == "rejected" else again.get(o.name, o) for o in outcomes]
    case.mutations = outcomes
    case.rows = tuple((o.name, o.description, o.max_error_ratio, o.outcome == "rejected") for o in outcomes)
    fan = source.fan_in
    for where, weights, inputs, exact, bound, bound_t in draws:
        try:
            given = {k: v.astype(np_dtype(dtype)) for k, v in weights.items()}  # the converter sees the dtype's arrays
            converted = _check_converted(target, convert(source, target, weights) if converter is None else converter(given))
            y_src = run(source_backend, source, weights, inputs, dtype=dtype, mask=mask)
            y_dst = run(target_backend, target, converted, inputs, dtype=dtype, mask=mask)
        except BackendUnavailable as exc:
            case.verdict, case.reason = "skip", str(exc)
            return case
        except VerificationError as exc:
            case.verdict, case.reason = "fail", str(exc)
            return case
        if y_dst.shape != y_src.shape:
            case.verdict, case.reason = "fail", f"the target gives outputs of shape={y_dst.shape}, the source {y_src.shape}"
            return case
        source_comparison = _comparison(y_src, exact, bound, dtype, accumulate, fan)
        comparison = _comparison(y_dst, exact, bound_t, dtype, accumulate, fan)
        if not where or not (comparison.passed and source_comparison.passed):  # the first draw's, or the one that decides
            case.source_comparison, case.comparison = source_comparison, comparison
            case.max_error, case.bound = comparison.max_abs_error, comparison.bound_at_worst
        if not source_comparison.passed:
            case.verdict = "inconclusive"
            case.reason = (f"the source layer on {source_backend} is itself out of its bound from the float64 reference"
                           f"{where}: {source_comparison.summary()}")
            return case
        if not comparison.passed:
            case.verdict = "fail"
            wrong = identify_mutant(source, target, weights, converted, dtype)
            named = identify(source, target, weights, converted, dtype) if wrong is None else wrong.description
            case.reason = (f"{target.describe()} disagrees with {source.describe()}{where}: "
                           f"{comparison.summary()}; {named}")
            if wrong is not None:
                order = wrong.name.split(":")[1] if wrong.name.startswith("gate_order:") else None
                code = plan(source.replace(gate_order=order), target).code("numpy") if order else ""
                case.diagnosis = {"mutant": wrong.name, "convention": convention_of(wrong.name),
                                  "description": wrong.description, "code": code, "right": plan(source, target).code("numpy")}
            return case
    missed = [o.name for o in outcomes if o.outcome != "rejected"]
    if missed:
        case.verdict = "inconclusive"
        case.reason = f"agree, but these mistakes would pass on the drawn data too: {', '.join(missed)}"
    else:
        case.verdict = "pass"
        assert case.comparison is not None
        also = f" and on {len(draws) - 1} grid draws" if len(draws) > 1 else ""
        case.reason = (f"agree within the bound (max error {case.max_error:.3g}, {case.comparison.max_error_ratio:.3f} of it)"
                       f"{also}; {len(outcomes)} mutants rejected")
    return case


# -- the checker's side ----------------------------------------------------------------------
_MODULES = {"torch": "torch", "keras": "keras", "onnxruntime": "onnxruntime", "flax": "flax", "tflite": "tensorflow"}


def resolve_backend(spec: SequenceSpec, dtype: str, allowed: tuple[str, ...] | None = None) -> tuple[str, str]:
    """``(backend, note)``: the framework that runs ``spec``'s layer in ``dtype``, else numpy (the reference) saying why."""
    import importlib.util

    name = backend_of(spec)
    label = spec.name or spec.describe()
    if name == "numpy":
        return name, ""
    if allowed is not None and name not in allowed:
        return "numpy", f"{label} ran on numpy: backend {name!r} is not among the allowed backends ({', '.join(allowed)})"
    if importlib.util.find_spec(_MODULES[name]) is None:
        return "numpy", f"{label} ran on numpy: backend {name!r} is not installed"
    if dtype in ("float16", "bfloat16") and name not in LOW_PRECISION:
        return "numpy", f"{label} ran on numpy: {name} does not run recurrent or attention layers in {dtype} here"
    return name, ""


def _spec_call(spec: SequenceSpec) -> str:
    """Python that rebuilds a preset spec (``ec.spec('torch:lstm', input_size=5, units=6)``), else its repr."""
    from equivcheck.sequence.presets import spec as preset

    if isinstance(spec, RecurrentSpec):
        kw: dict[str, Any] = dict(input_size=spec.input_size, units=spec.units)
        if spec.bidirectional:
            kw["bidirectional"] = True
        if spec.cell == "gru" and spec.storage in ("keras", "onnx"):
            kw["reset_after"] = spec.reset_after
    else:
        kw = dict(embed_dim=spec.embed_dim, heads=spec.heads)
        if spec.head_dim * spec.heads != spec.embed_dim:
            kw["head_dim"] = spec.head_dim
        if spec.kv_heads != spec.heads:
            kw["kv_heads"] = spec.kv_heads
        if not spec.bias:
            kw["bias"] = False
    with contextlib.suppress(EquivcheckError, ValueError):
        if spec.name and preset(spec.name, **kw) == spec:
            return f"ec.spec({spec.name!r}, {', '.join(f'{k}={v!r}' for k, v in kw.items())})"
    return f"ec.{spec!r}"


def failure_message(case: Case, converter: str) -> str:
    """The assertion message of a failed recurrent or attention check: the case, the mistake, the right plan, a reproducer."""
    lines = [f"{converter} does not convert {case.title()} correctly ({case.verdict})",
             f"  source     {case.source.describe()}",
             f"  target     {case.target.describe()}",
             f"  run on     {case.source_backend} → {case.target_backend}, {case.dtype}, seed={case.seed}"]
    if case.diagnosis:
        lines.append(f"  mistake    {case.diagnosis['description']}")
    lines.append(f"  result     {case.reason}")
    with contextlib.suppress(EquivcheckError):
        code = plan(case.source, case.target).code("numpy").splitlines()
        lines += [f"  right      {code[0]}", *(f"             {line}" for line in code[1:])]
    lines += [f"  note       {n}" for n in case.notes]
    lines += ["  reproduce:", "    import equivcheck as ec", "    # converter: your function, a dict of named tensors in and out",
              f"    source = {_spec_call(case.source)}", f"    target = {_spec_call(case.target)}",
              f"    case = ec.verify_pair(source, target, converter=converter, source_backend={case.source_backend!r}, "
              f"target_backend={case.target_backend!r}, dtype={case.dtype!r}, seed={case.seed})",
              "    print(case.verdict, case.reason)"]
    return "\n".join(lines)

"""Verify a conversion on real layers: spec pair + converter + backends → :class:`Case`.

Weights and inputs are drawn once; the source layer runs on one backend, the converted
target on another, both are compared with the exact result (float64 numpy on the very same
rounded values) under :mod:`equivcheck.compare`'s bound, and every mutant of
:mod:`equivcheck.mutations` must be rejected on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck import backends as _backends
from equivcheck._arrays import to_numpy
from equivcheck._copy import check_dtype
from equivcheck.backends.base import np_dtype
from equivcheck.backends.numpy import forward as np_forward
from equivcheck.backends.probe import Facts, probe
from equivcheck.compare import Comparison, compare
from equivcheck.data import detection_batch, sample_inputs, sample_weights
from equivcheck.errors import EquivcheckError, SpecError, VerificationError, renamed
from equivcheck.mapping import Mapping
from equivcheck.memory import require_memory
from equivcheck.plan import plan
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec, fan_in

__all__ = ["Case", "MutationOutcome", "draw", "verify", "verify_pair"]

Converter = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class MutationOutcome:
    name: str
    description: str
    outcome: str  # "rejected" | "not rejected" | "ambiguous"
    max_error_ratio: float | None = None
    convention: str = ""  # the report column: see equivcheck.mutations.Convention

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "outcome": self.outcome,
                "max_error_ratio": self.max_error_ratio, "convention": self.convention}


@dataclass
class Case:
    """One conversion checked on one backend pair in one dtype."""

    source: LayerSpec
    target: LayerSpec
    source_backend: str
    target_backend: str
    dtype: str
    verdict: str  # "pass" | "fail" | "inconclusive" | "skip" | "error"
    mapping: Mapping | None = None
    comparison: Comparison | None = None
    source_comparison: Comparison | None = None
    mutations: list[MutationOutcome] = field(default_factory=list)
    reason: str = ""
    seed: int = 0
    errors: dict[str, Any] = field(default_factory=dict, repr=False)  # error maps for pictures
    diagnosis: dict[str, str] | None = None  # a failed conversion that is exactly one mutant: which
    facts: dict[str, Facts] = field(default_factory=dict)  # "source"/"target": what the probes found
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def title(self) -> str:
        return f"{self.source.name or self.source.kind} → {self.target.name or self.target.kind}"

    def to_dict(self) -> dict[str, Any]:
        from equivcheck.serialize import spec_to_dict

        return {
            "source": spec_to_dict(self.source),
            "target": spec_to_dict(self.target),
            "source_backend": self.source_backend,
            "target_backend": self.target_backend,
            "dtype": self.dtype,
            "verdict": self.verdict,
            "reason": self.reason,
            "seed": self.seed,
            "mapping": None if self.mapping is None else {
                **self.mapping.to_dict(),
                "code": {lang: self.mapping.code(lang) for lang in ("numpy", "torch", "einops")},
            },
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "source_comparison": None if self.source_comparison is None else self.source_comparison.to_dict(),
            "mutations": [m.to_dict() for m in self.mutations],
            **({"diagnosis": dict(self.diagnosis)} if self.diagnosis else {}),
            "facts": {role: f.to_dict() for role, f in self.facts.items()},
            "notes": list(self.notes),
        }


# -- data --------------------------------------------------------------------------------
def draw(spec: LayerSpec, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Random kernel and bias for ``spec``, rounded to ``dtype``: see :func:`equivcheck.data.sample_weights`."""
    return sample_weights(spec, dtype, rng)


def canonical_input(spec: LayerSpec, batch: int | None, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Inputs ``(batch, channels, *spatial)``: see :func:`equivcheck.data.sample_inputs`."""
    return sample_inputs(spec, batch, dtype, rng)


def to_layout(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if spec.data_format == CHANNELS_LAST and x.ndim > 2 else x


def from_layout(y: np.ndarray, spec: LayerSpec) -> np.ndarray:
    return np.moveaxis(y, -1, 1) if spec.data_format == CHANNELS_LAST and y.ndim > 2 else y


def _aligned(spec: LayerSpec, other: LayerSpec) -> tuple[Callable, Callable]:
    """Input and output adapters so both layers of a pair see the same map and give the same output.

    A dense layer on plain features beside a pointwise conv runs once per map position.
    """
    pointwise = isinstance(spec, DenseSpec) and spec.rank == 0 and isinstance(other, ConvSpec)
    if pointwise:
        def run_in(x: np.ndarray) -> np.ndarray:
            return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])

        def run_out(y: np.ndarray, x: np.ndarray) -> np.ndarray:
            return np.moveaxis(y.reshape(x.shape[0], *x.shape[2:], -1), -1, 1)

        return run_in, run_out

    def plain_in(x: np.ndarray) -> np.ndarray:
        return to_layout(x, spec)

    def plain_out(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y = from_layout(y, spec)
        return y.reshape(y.shape[0], -1) if isinstance(other, DenseSpec) or isinstance(spec, DenseSpec) else y

    return plain_in, plain_out


def input_spec(source: LayerSpec, target: LayerSpec) -> LayerSpec:
    """The spec whose map both layers read (the conv's, when a dense one reads plain features)."""
    if isinstance(source, DenseSpec) and source.rank == 0 and isinstance(target, ConvSpec):
        return target
    return source


def _run(backend: str, spec: LayerSpec, dtype: str, kernel: np.ndarray, bias: np.ndarray | None,
         x: np.ndarray, adapt: tuple[Callable, Callable]) -> np.ndarray:
    layer = _backends.get(backend).build(spec, dtype)
    layer.set_weights(kernel, bias)
    return adapt[1](np.asarray(layer(adapt[0](x))), x)


# -- the check ---------------------------------------------------------------------------
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
    """
    if mutations is not None:
        mutants = renamed("mutations", "mutants", mutations)
    np_dtype(dtype)  # an unknown dtype is an error, not a skip
    case = Case(source, target, source_backend, target_backend, dtype, "error", seed=seed)
    for role, name, spec in (("source", source_backend, source), ("target", target_backend, target)):
        backend = _backends.get(name)
        if not backend.available():
            case.verdict, case.reason = "skip", f"backend {name!r} is not installed ({backend.module})"
            return case
        facts = case.facts[role] = probe(backend, spec, dtype)  # each backend runs only its own spec
        if not facts.runs:
            case.verdict, case.reason = "skip", f"{name} cannot run the {role} here: {facts.reason}"
            return case
        if not facts.decided:
            case.notes.append(f"{role} on {name}: {facts.summary()}")
    if data is not None:
        batch = len(data[2])
    elif batch is None:
        batch = detection_batch(input_spec(source, target))
    in_elems = batch * math.prod(input_spec(source, target).input_shape)
    out_elems = batch * max(math.prod(source.output_shape), math.prod(target.output_shape))
    require_memory(f"verifying {source.describe()} -> {target.describe()}",
                   8 * (6 * math.prod(source.kernel_shape) + 4 * in_elems + 8 * out_elems))
    rng = np.random.default_rng(seed)
    kernel, bias = draw(source, dtype, rng) if data is None else data[:2]
    try:
        mapping = plan(source, target)
        case.mapping = mapping
    except EquivcheckError:
        if converter is None:
            raise
        mapping = None
    convert = converter or (lambda k, b: _planned(source, target, k, b))
    new_kernel, new_bias = _call_converter(convert, kernel, bias, target, dtype)

    x = canonical_input(input_spec(source, target), batch, dtype, rng) if data is None else data[2]
    src_adapt, tgt_adapt = _aligned(source, target), _aligned(target, source)
    f64 = np.float64
    exact = src_adapt[1](np_forward(source, kernel.astype(f64), None if bias is None else bias.astype(f64),
                                    src_adapt[0](x.astype(f64))), x)
    magnitude = src_adapt[1](np_forward(source, np.abs(kernel.astype(f64)), None if bias is None else np.abs(bias.astype(f64)),
                                        src_adapt[0](np.abs(x.astype(f64)))), x)
    # Where a backend rounds the sum before adding the bias, the bound needs the exact sum too.
    exact_nb = None if bias is None else src_adapt[1](np_forward(source, kernel.astype(f64), None, src_adapt[0](x.astype(f64))), x)
    # A zero input adds exact zeros: rounding errors come from the non-zero products only.
    products = max(1, min(fan_in(source), int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max(initial=1))))

    def judge(y: np.ndarray, role: str = "target") -> Comparison:
        """Each output is judged by how its own backend was probed to round and sum."""
        facts = case.facts[role]
        acc = "tf32" if tf32 and dtype == "float32" else facts.accumulate
        return compare(y, exact, magnitude, dtype=dtype, fan_in=products, accumulate=acc,
                       exact_without_bias=exact_nb if facts.roundings == 2 else None)

    y_src = _run(source_backend, source, dtype, kernel, bias, x, src_adapt)
    case.source_comparison = judge(y_src, "source")
    y_tgt = _run(target_backend, target, dtype, new_kernel, new_bias, x, tgt_adapt)
    case.comparison = judge(y_tgt)
    case.errors = {"output": np.abs(y_tgt.astype(f64) - exact)}
    if not case.source_comparison.passed:
        case.verdict = "error"
        case.reason = f"the source layer on {source_backend} disagrees with the numpy reference: {case.source_comparison.summary()}"
        return case
    if not case.comparison.passed:
        case.verdict = "fail"
        case.reason = case.comparison.summary()
        if mapping is not None:
            case.diagnosis = _diagnose(source, target, kernel, bias, new_kernel, new_bias)
    else:
        case.verdict = "pass"
    if mutants and mapping is not None:
        _check_mutants(case, mapping, kernel, bias, new_bias, x, tgt_adapt, judge)
    return case


def _diagnose(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
              new_kernel: np.ndarray, new_bias: np.ndarray | None) -> dict[str, str] | None:
    """Which single mistake a failed conversion is, from its weights alone (:func:`equivcheck.identify.identify`)."""
    from equivcheck.identify import identify

    return identify(source, target, new_kernel, new_bias, source_kernel=kernel, source_bias=bias).diagnosis()


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None) == (b is None) and (a is None or np.array_equal(a, np.asarray(b).astype(a.dtype)))


def _planned(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None) -> tuple:
    from equivcheck.plan import convert

    return convert(source, target, kernel, bias)


def _call_converter(convert: Converter, kernel: np.ndarray, bias: np.ndarray | None, target: LayerSpec,
                    dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    result = convert(kernel.copy(), None if bias is None else bias.copy())
    if not (isinstance(result, tuple) and len(result) == 2):
        raise SpecError(f"converter returned {type(result).__name__}: expected a (kernel, bias) tuple")
    arrays = []
    for what, r in zip(("kernel", "bias"), result):
        try:
            a = None if r is None else np.asarray(to_numpy(r))
        except (ValueError, TypeError) as exc:  # ragged lists and the like
            raise VerificationError(f"converter returned a {what} that is not an array ({type(r).__name__}): {exc}") from None
        if a is not None:
            check_dtype(a.dtype, f"converter's {what}")
        arrays.append(a)
    new_kernel, new_bias = arrays
    if new_kernel is None or new_kernel.shape != target.kernel_shape:
        got = None if new_kernel is None else new_kernel.shape
        raise VerificationError(f"converter returned a kernel of shape={got}: the target expects {target.kernel_shape}")
    if target.bias and (new_bias is None or new_bias.shape != target.bias_shape):
        got = None if new_bias is None else new_bias.shape
        raise VerificationError(f"converter returned a bias of shape={got}: the target expects {target.bias_shape}")
    dt = np_dtype(dtype)
    return new_kernel.astype(dt), None if new_bias is None or not target.bias else new_bias.astype(dt)


def _check_mutants(case: Case, mapping: Mapping, kernel: np.ndarray, bias: np.ndarray | None,
                   new_bias: np.ndarray | None, x: np.ndarray, adapt: tuple, judge: Callable) -> None:
    from equivcheck.mutations import mutants

    backend = _backends.get(case.target_backend)
    layer = backend.build(case.target, case.dtype)
    for mutant in mutants(case.source, case.target, mapping):
        wrong_bias = new_bias if mutant.bias is None or new_bias is None else mutant.bias.apply(new_bias)
        runs = mutant.target is None or probe(backend, mutant.target, case.dtype).runs
        if mutant.ambiguous or (mutant.bias is not None and new_bias is None) or not runs:
            case.mutations.append(MutationOutcome(mutant.name, mutant.description, "ambiguous", convention=str(mutant.convention)))
            continue
        wrong_layer = layer if mutant.target is None else backend.build(mutant.target, case.dtype)
        wrong_layer.set_weights(mutant.mapping.apply(kernel), wrong_bias)
        result = judge(adapt[1](np.asarray(wrong_layer(adapt[0](x))), x))
        outcome = "not rejected" if result.passed else "rejected"
        case.mutations.append(MutationOutcome(mutant.name, mutant.description, outcome, result.max_error_ratio,
                                              convention=str(mutant.convention)))
    missed = [m.name for m in case.mutations if m.outcome == "not rejected"]
    if case.verdict == "pass" and missed:
        case.verdict = "inconclusive"
        case.reason = f"these wrong conversions also pass on this data: {', '.join(missed)}"


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

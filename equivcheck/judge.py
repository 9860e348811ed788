"""The judge: one converted layer pair judged once, into the :class:`Case` every report draws from.

Every layer-level check hands the judge the same things — two specs, two backends, the dtype and
a converter (or the planned conversion): :func:`equivcheck.verification.verify_pair`, the checker's
cases and the soundness benchmark all go through :func:`judge_pair`; explore's confirming run,
whose two sides are black boxes rather than backends, judges them with the same exact reference
and bound (:class:`Reference`, which reads a kernel covering the map a block at a time from the
stored array); a whole-model check replays its pairs on captured data and uses the same mutant
engine (:func:`mutant_outcomes`) and diagnosis (:func:`equivcheck.modelcheck.judge.diagnose_pair`).

The judge probes both backends once (:func:`equivcheck.backends.probe.probe`), draws weights
and inputs from those facts (sparser where a backend sums below float32, so that one wrong
weight still shows above the rounding), plans once, runs the two real layers, compares each
with the exact float64 result under its own probed bound, rejects every mutant of
:mod:`equivcheck.mutations` on the same data and, on a failure, names the mistake
(:func:`equivcheck.identification.identify`, once).

A mutant is judged in float64 on the reference: it is rejected only where its exact output
moves from the right one by more than the two bounds together, so that no run of the real
layer within its bound could pass it. The proof needs no forward pass of the real layer per
mutant: a pair's catalogue, and for a small kernel the index that gathers every mutant kernel
at once, is worked out once per pair; all mutants of the layer's own kind go through one stacked
float64 forward and are judged in one pass over the stacked outputs. On a small dense layer a
mutant that only reorders the kernel's rows and columns is the same kernel on reordered inputs
(no kernel per mutant is built), and the real layers of a small spec are built once and reused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck import backends as registry
from equivcheck._arrays import to_numpy
from equivcheck._copy import check_dtype
from equivcheck.backends.numpy import dense_features
from equivcheck.backends.numpy import forward as reference_forward
from equivcheck.backends.probe import Facts, probe_with_keys
from equivcheck.compare import Comparison, compare, error_bound
from equivcheck.data import detection_batch, nonzeros_for, sample_inputs, sample_weights
from equivcheck.dtypes import np_dtype
from equivcheck.errors import EquivcheckError, SpecError, VerificationError
from equivcheck.mapping import Mapping, Reshape, Transpose
from equivcheck.memory import require_memory
from equivcheck.planning import convert as planned_convert
from equivcheck.planning import plan
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec, fan_in

__all__ = [
    "Case",
    "Converter",
    "MutationOutcome",
    "Reference",
    "aligned",
    "draw_data",
    "from_layout",
    "input_spec",
    "judge_pair",
    "mutant_outcomes",
    "pair_facts",
    "replayed_mutants",
    "to_layout",
]

Converter = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class MutationOutcome:
    name: str
    description: str
    outcome: str  # "rejected" | "not rejected" | "ambiguous"
    max_error_ratio: float | None = None  # max |Δy| over the two bounds together: > 1 is rejected
    convention: str = ""  # the report column: see equivcheck.mutations.Convention
    mapping: Mapping | None = None  # the wrong conversion of the source kernel (pictures draw it)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "outcome": self.outcome,
                "max_error_ratio": self.max_error_ratio, "convention": self.convention,
                **({"mapping": self.mapping.to_dict()} if self.mapping is not None else {})}


@dataclass
class Case:
    """One conversion checked on one backend pair in one dtype: the judge's record."""

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
    identification: Any = field(default=None, repr=False)  # the failure's Identification (identify, run once)

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


# -- layouts -----------------------------------------------------------------------------
def to_layout(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """A canonical ``(N, C, *spatial)`` batch in ``spec``'s own data format."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if spec.data_format == CHANNELS_LAST and x.ndim > 2 else x


def from_layout(y: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """``spec``'s output back to channels first."""
    return np.moveaxis(y, -1, 1) if spec.data_format == CHANNELS_LAST and y.ndim > 2 else y


def input_spec(source: LayerSpec, target: LayerSpec) -> LayerSpec:
    """The spec whose map both layers read (the conv's, when a dense one reads plain features)."""
    if isinstance(source, DenseSpec) and source.rank == 0 and isinstance(target, ConvSpec):
        return target
    return source


def aligned(spec: LayerSpec, other: LayerSpec) -> tuple[Callable, Callable]:
    """Input and output adapters so both layers of a pair see the same map and give the same output.

    A dense layer on plain features beside a pointwise conv runs once per map position.
    """
    if isinstance(spec, DenseSpec) and spec.rank == 0 and isinstance(other, ConvSpec):
        def run_in(x: np.ndarray) -> np.ndarray:
            return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])

        def run_out(y: np.ndarray, x: np.ndarray) -> np.ndarray:
            return np.moveaxis(y.reshape(x.shape[0], *x.shape[2:], -1), -1, 1)

        return run_in, run_out
    flat = isinstance(other, DenseSpec) or isinstance(spec, DenseSpec)

    def plain_in(x: np.ndarray) -> np.ndarray:
        return to_layout(x, spec)

    def plain_out(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y = from_layout(y, spec)
        return y.reshape(y.shape[0], -1) if flat else y

    return plain_in, plain_out


# -- facts and data ----------------------------------------------------------------------
def pair_facts(source: LayerSpec, target: LayerSpec, source_backend: str, target_backend: str,
               dtype: str) -> tuple[dict[str, Facts], str]:
    """Each backend probed on its own spec: ``(facts by role, why the pair cannot run here or "")``."""
    facts: dict[str, Facts] = {}
    keys: dict[str, str] = {}
    for role, name, spec in (("source", source_backend, source), ("target", target_backend, target)):
        backend = registry.get(name)
        if not backend.available():
            return facts, f"backend {name!r} is not installed ({backend.module})"
        facts[role] = probe_with_keys(backend, spec, dtype, keys)
        if not facts[role].runs:
            return facts, f"{name} cannot run the {role} here: {facts[role].reason}"
    return facts, ""


def draw_data(source: LayerSpec, target: LayerSpec, dtype: str, facts: dict[str, Facts], seed: int,
              batch: int | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(kernel, bias, x)`` for a pair, drawn from ``seed`` at the density its probed sums allow.

    Where a backend sums below float32 its rounding grows with the non-zero products while one
    wrong weight's effect does not: the inputs get fewer non-zeros per receptive field
    (:func:`equivcheck.data.nonzeros_for`) and the batch grows so every weight is still exercised.
    """
    reads = input_spec(source, target)
    nonzeros = nonzeros_for(reads, [f.accumulate for f in facts.values()])
    rng = np.random.default_rng(seed)
    kernel, bias = sample_weights(source, dtype, rng, nonzeros=nonzeros)
    x = sample_inputs(reads, detection_batch(reads, nonzeros) if batch is None else batch, dtype, rng,
                      nonzeros=nonzeros)
    return kernel, bias, x


# -- the judgement -----------------------------------------------------------------------
class Reference:
    """Exact float64 outputs of one side of a pair on one canonical batch, and the bound they are judged by.

    ``accumulate``: the precisions the judged layers sum in; with two (a replayed model layer judged
    against its real partner, not against the exact result) the two bounds add.
    """

    def __init__(self, spec: LayerSpec, other: LayerSpec, x: np.ndarray, *, dtype: str, fan: int,
                 accumulate: tuple[str, ...] = ("",), roundings: int = 2) -> None:
        self.spec, self.adapt = spec, aligned(spec, other)
        self.x = x
        self.dtype, self.fan, self.roundings = dtype, fan, roundings
        self.accumulate = tuple(a or None for a in accumulate)
        self._abs_of: np.ndarray | None = None
        self._abs: np.ndarray | None = None

    @functools.cached_property
    def x64(self) -> np.ndarray:
        return self.adapt[0](self.x.astype(np.float64))

    @functools.cached_property
    def abs_x64(self) -> np.ndarray:
        return np.abs(self.x64)

    @classmethod
    def probed(cls, spec: LayerSpec, other: LayerSpec, x: np.ndarray, facts: Facts, *, dtype: str, fan: int,
               tf32: bool = False) -> Reference:
        """Judged by one backend's probed facts."""
        acc = "tf32" if tf32 and dtype == "float32" else facts.accumulate
        return cls(spec, other, x, dtype=dtype, fan=fan, accumulate=(acc,), roundings=facts.roundings)

    def forward(self, kernel: np.ndarray, bias: np.ndarray | None, *, absolute: bool = False,
                spec: LayerSpec | None = None) -> np.ndarray:
        k = np.asarray(kernel, np.float64)
        b = None if bias is None else np.asarray(bias, np.float64)
        if absolute:
            k, b = self.abs_kernel(k), None if b is None else np.abs(b)
        y = reference_forward(spec or self.spec, k, b, self.abs_x64 if absolute else self.x64)
        return self.adapt[1](y, self.x)

    def abs_kernel(self, kernel: np.ndarray) -> np.ndarray:
        """``|kernel|``; kept for the next call with the same read-only kernel (the judge's float64 copy,
        read by the exact outputs and again by the mutants)."""
        if kernel is self._abs_of and not kernel.flags.writeable:
            return self._abs
        absolute = np.abs(kernel)
        if not kernel.flags.writeable and kernel.size <= GATHER_MAX_KERNEL:  # never holds on to a large one
            absolute.setflags(write=False)
            self._abs_of, self._abs = kernel, absolute
        return absolute

    def outputs(self, kernel: np.ndarray, bias: np.ndarray | None, spec: LayerSpec | None = None, *,
                stored: Mapping | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(exact, |W|·|x| + |b|, exact before the bias: None without one).

        ``stored``: ``kernel`` is a stored array and ``stored(kernel)`` the layer's kernel. A kernel
        that covers the map (a VGG fc6 as a 7×7 conv) is then read a block of output channels at a
        time, straight from the stored array: no full-size copy, in float32 or float64.
        """
        spec = spec or self.spec
        if stored is not None:
            lean = self._covering(kernel, bias, spec, stored)
            if lean is not None:
                return lean
            kernel = stored.apply(kernel)
        kernel = np.asarray(kernel, np.float64)  # once for both forwards
        nb = self.forward(kernel, None, spec=spec)
        mag = self.forward(kernel, bias, absolute=True, spec=spec)
        if bias is None:
            return nb, mag, None
        return nb + _per_channel(bias, nb), mag, nb

    def _covering(self, stored_kernel: np.ndarray, bias: np.ndarray | None, spec: LayerSpec,
                  stored: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """:meth:`outputs` of a conv whose kernel covers the map, a block of output channels at a time; None for
        any other layer. Each output is one dot product of the canonical kernel's row with the flat map."""
        from equivcheck.planning import canonical

        if not (isinstance(spec, ConvSpec) and spec.groups == 1 and spec.covers_map):
            return None
        to_canon = canonical(spec)
        m = stored if to_canon.is_identity else stored.then(to_canon)
        last = spec.data_format == CHANNELS_LAST and self.x.ndim > 2
        flat = (np.moveaxis(self.x64, -1, 1) if last else self.x64).reshape(len(self.x), -1)
        aflat = (np.moveaxis(self.abs_x64, -1, 1) if last else self.abs_x64).reshape(len(self.x), -1)
        n, o = flat.shape[0], spec.out_channels
        y, mag = np.empty((n, o)), np.empty((n, o))
        for o0, o1, part in _kernel_rows(m, stored_kernel, max(1, CHUNK_WEIGHTS // flat.shape[1])):
            # einsum's own loop, not BLAS: no thread pool to contend with on a busy machine
            y[:, o0:o1] = np.einsum("nk,ok->no", flat, part)
            np.abs(part, out=part)
            mag[:, o0:o1] = np.einsum("nk,ok->no", aflat, part)
        nb = None
        if bias is not None:
            b64 = np.asarray(bias, np.float64)
            nb = y.copy()
            y += b64
            mag += np.abs(b64)
        shape = (n, o, *(1,) * spec.rank)

        def out(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else self.adapt[1](to_layout(a.reshape(shape), spec), self.x)

        return out(y), out(mag), out(nb)

    def _before_bias(self, nb: np.ndarray | None) -> np.ndarray | None:
        """The sum before the bias matters to the bound only where the output is rounded twice."""
        return nb if self.roundings == 2 else None

    def compare(self, y: np.ndarray, exact: np.ndarray, mag: np.ndarray, nb: np.ndarray | None) -> Comparison:
        return compare(y, exact, mag, dtype=self.dtype, fan_in=self.fan, accumulate=self.accumulate[0],
                       exact_without_bias=self._before_bias(nb))

    def bound(self, exact: np.ndarray, mag: np.ndarray, nb: np.ndarray | None) -> np.ndarray:
        bounds = [error_bound(exact, mag, dtype=self.dtype, fan_in=self.fan, accumulate=acc,
                              exact_without_bias=self._before_bias(nb)) for acc in self.accumulate]
        return bounds[0] if len(bounds) == 1 else sum(bounds)


#: A kernel that covers the map is read this many float64 weights at a time (:meth:`Reference.outputs`).
CHUNK_WEIGHTS = 1 << 19


def _rows_view(m: Mapping, a: np.ndarray) -> np.ndarray | None:
    """``m.apply(a)`` as a view whose leading axes make up the output channels; None if no view exists.

    The final reshape (atoms → the kernel's axes) is left out: it is the one step that would copy.
    """
    ops = list(m.simplify().ops)
    if ops and isinstance(ops[-1], Reshape):
        ops.pop()
    view = a
    for op in ops:
        if isinstance(op, Reshape):
            try:
                view = view.reshape(op.shape, copy=False)
            except (ValueError, TypeError):
                return None
        elif isinstance(op, Transpose):
            view = view.transpose(op.perm)
        else:
            view = view[tuple(slice(None, None, -1) if i in op.axes else slice(None) for i in range(view.ndim))]
    return view


def _kernel_rows(m: Mapping, a: np.ndarray, rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(o0, o1, block)``: rows ``o0:o1`` of the canonical kernel ``m(a)`` as a float64 (rows, in) block."""
    o = m.out_shape[0]
    view = _rows_view(m, a)
    lead = next((k for k in range(1, view.ndim + 1) if math.prod(view.shape[:k]) == o), None) if view is not None else None
    if view is None or lead is None or view.ndim == 0:
        k2 = m.apply(a).reshape(o, -1)
        for o0 in range(0, o, rows):
            yield o0, min(o, o0 + rows), k2[o0 : o0 + rows].astype(np.float64)
        return
    inner = math.prod(view.shape[1:lead])
    step = max(1, rows // inner)
    for i0 in range(0, view.shape[0], step):
        block = np.array(view[i0 : i0 + step], dtype=np.float64)
        yield i0 * inner, min(o, (i0 + step) * inner), block.reshape(-1, a.size // o)


def judge_pair(
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
    identify_with: Callable[[], Any] | None = None,
) -> Case:
    """Judge one conversion on one backend pair: the whole judgement, once; raises only for bad arguments.

    ``converter(kernel, bias) -> (kernel, bias)``; ``None`` is the planned conversion.
    ``data = (kernel, bias, x)`` replaces the drawn data (x canonical: ``(batch, channels, *spatial)``).
    ``identify_with()`` names a failure's conventions (the checker's probe of the converter);
    by default the converted weights themselves are identified.
    """
    np_dtype(dtype)  # an unknown dtype is an error, not a skip
    case = Case(source, target, source_backend, target_backend, dtype, "error", seed=seed)
    case.facts, skipped = pair_facts(source, target, source_backend, target_backend, dtype)
    if skipped:
        case.verdict, case.reason = "skip", skipped
        return case
    for role, name in (("source", source_backend), ("target", target_backend)):
        if not case.facts[role].decided:
            case.notes.append(f"{role} on {name}: {case.facts[role].summary()}")
    reads = input_spec(source, target)
    n = len(data[2]) if data is not None else batch or detection_batch(
        reads, nonzeros_for(reads, [f.accumulate for f in case.facts.values()]))
    in_elems = n * math.prod(reads.input_shape)
    out_elems = n * max(math.prod(source.output_shape), math.prod(target.output_shape))
    require_memory(_label(source, target),
                   8 * (6 * math.prod(source.kernel_shape) + 4 * in_elems + 10 * out_elems))
    kernel, bias, x = draw_data(source, target, dtype, case.facts, seed, batch) if data is None else data
    try:
        right = case.mapping = plan(source, target)
    except EquivcheckError:
        if converter is None:
            raise
        right = None
    if converter is None and data is None and source.bias == target.bias:
        # Drawn data are finite and of the right shapes: the planned conversion, without checking them again.
        def convert(k: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
            return right.apply(k), None if b is None else b.copy()
    else:
        convert = converter or (lambda k, b: planned_convert(source, target, k, b))
    # A user's converter gets copies (it may write into them); the planned one never writes into its input.
    new_kernel, new_bias = _call_converter(convert, kernel, bias, target, dtype, copy=converter is not None)

    # A zero input adds exact zeros: rounding errors come from the non-zero products only.
    fan = max(1, min(fan_in(source), int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max(initial=1))))
    src = Reference.probed(source, target, x, case.facts["source"], dtype=dtype, fan=fan, tf32=tf32)
    tgt = Reference.probed(target, source, x, case.facts["target"], dtype=dtype, fan=fan, tf32=tf32)
    # The exact outputs and the mutants read the source kernel in float64: converted once (a small one).
    kernel64 = kernel
    if kernel.size <= GATHER_MAX_KERNEL:
        kernel64 = np.array(kernel, np.float64)  # our own copy, read-only: its |·| is worked out once
        kernel64.setflags(write=False)
    y_src = _run(source_backend, source, dtype, kernel, bias, src)  # both real layers first, back to back
    y_tgt = _run(target_backend, target, dtype, new_kernel, new_bias, tgt)
    exact, mag, nb = src.outputs(kernel64, bias)
    case.source_comparison = src.compare(y_src, exact, mag, nb)
    # The target is judged by how its own backend rounds and sums.
    case.comparison = tgt.compare(y_tgt, exact, mag, nb)
    case.errors = {"output": np.abs(y_tgt.astype(np.float64) - exact)}
    if not case.source_comparison.passed:
        case.reason = (f"the source layer on {source_backend} disagrees with the numpy reference: "
                       f"{case.source_comparison.summary()}")
        return case
    if not case.comparison.passed:
        case.verdict, case.reason = "fail", case.comparison.summary()
        if right is not None:
            case.identification = identify_with() if identify_with is not None else _identify(
                source, target, kernel, bias, new_kernel, new_bias)
            case.diagnosis = case.identification.diagnosis()
    else:
        case.verdict = "pass"
    if mutants and right is not None:
        case.mutations = mutant_outcomes(source, target, right, kernel64, bias, tgt, (exact, mag, nb), src)
        missed = [m.name for m in case.mutations if m.outcome == "not rejected"]
        if case.verdict == "pass" and missed:
            case.verdict = "inconclusive"
            case.reason = f"these wrong conversions also pass on this data: {', '.join(missed)}"
    return case


#: Built layers kept for the next case of the same spec (building is a large part of a small case), at most
#: :data:`LAYER_POOL` of them, each with a kernel of at most :data:`REUSE_MAX_KERNEL` weights.
LAYER_POOL = 16
REUSE_MAX_KERNEL = 1 << 18
_LAYERS: dict[tuple, Any] = {}


def _run(backend: str, spec: LayerSpec, dtype: str, kernel: np.ndarray, bias: np.ndarray | None,
         ref: Reference) -> np.ndarray:
    b = registry.get(backend)
    # Keyed by the build function too: a replaced one (a test's fake) builds anew.
    key = (b, getattr(b.build, "__func__", b.build), spec, dtype)
    reuse = math.prod(spec.kernel_shape) <= REUSE_MAX_KERNEL
    layer = _LAYERS.pop(key, None) if reuse else None  # out of the pool while in use: one case at a time
    reused = layer is not None
    if not reused:
        layer = b.build(spec, dtype)
    try:
        y = _forward(layer, kernel, bias, ref)
    except Exception:
        if not reused:
            raise
        layer = b.build(spec, dtype)  # whatever went wrong on a reused layer, a new one decides
        y = _forward(layer, kernel, bias, ref)
    if reuse:  # only a layer that ran without raising goes back
        _LAYERS[key] = layer
        while len(_LAYERS) > LAYER_POOL:
            try:
                _LAYERS.pop(next(iter(_LAYERS)), None)  # the oldest
            except (RuntimeError, StopIteration):  # another thread changed the pool meanwhile
                break
    return y


def _forward(layer: Any, kernel: np.ndarray, bias: np.ndarray | None, ref: Reference) -> np.ndarray:
    # Every weight, so nothing of a reused layer's last case is left; read in place (these arrays are never
    # written, and the next case's set_weights lets go of them)
    layer.set_weights(kernel, bias, copy=False)
    return ref.adapt[1](np.asarray(layer(ref.adapt[0](ref.x))), ref.x)


def _identify(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
              new_kernel: np.ndarray, new_bias: np.ndarray | None) -> Any:
    from equivcheck.identification import identify

    return identify(source, target, new_kernel, new_bias, source_kernel=kernel, source_bias=bias)


@functools.lru_cache(maxsize=256)
def _label(source: LayerSpec, target: LayerSpec) -> str:
    return f"verifying {source.describe()} -> {target.describe()}"


def _call_converter(convert: Converter, kernel: np.ndarray, bias: np.ndarray | None, target: LayerSpec,
                    dtype: str, *, copy: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    result = convert(kernel.copy(), None if bias is None else bias.copy()) if copy else convert(kernel, bias)
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
    # The converter's kernel is already its own (a user's converter got copies): copied only to convert it, or
    # where it is read-only (a jax array's view), as a framework may want to write.
    kernel_out = new_kernel.astype(dt, copy=not new_kernel.flags.writeable)
    return kernel_out, None if new_bias is None or not target.bias else new_bias.astype(dt)


# -- mutants -----------------------------------------------------------------------------
def _stacked(spec: LayerSpec, count: int) -> tuple[LayerSpec, int, int] | None:
    """``spec`` with ``count`` times the outputs, the kernel axis they stack on and the output axis (raw layout).

    None where stacking would change the function (groups, transposed convs).
    """
    if isinstance(spec, DenseSpec):
        return spec.replace(units=spec.units * count), spec.kernel_layout.index("O"), -1
    if spec.groups != 1 or spec.transposed:
        return None
    return (spec.replace(out_channels=spec.out_channels * count), spec.kernel_layout.index("O"),
            -1 if spec.data_format == CHANNELS_LAST else 1)


#: Kernels up to this size have their stacked mutant kernels gathered through one index cached per pair (less
#: per-case Python and copying); larger ones are rearranged a mutant at a time (the index would outweigh them).
GATHER_MAX_KERNEL = 1 << 15


@dataclass(frozen=True)
class _MutantPlan:
    """What a pair's mutants need besides the data, worked out once per pair (:func:`_mutant_plan`)."""

    found: tuple[Any, ...]  # the catalogue: equivcheck.mutations.Mutant
    same_layer: tuple[int, ...]  # the mutants of the side's own layer, judged together
    maps: tuple[Mapping, ...]  # for each of them: the source kernel to the side's kernel
    stack: tuple[LayerSpec, int, int] | None  # see _stacked, for the maps in ``gathered``; None: one forward each
    index: np.ndarray | None  # their stacked kernel as indices into the flat source kernel (small kernels only)
    kernel_shape: tuple[int, ...] = ()  # the source kernel's, which the index reads
    gathered: tuple[int, ...] = ()  # positions in ``maps`` whose kernels are built (the rest: ``permuted``)
    permuted: tuple[int, ...] = ()  # positions in ``maps`` of a dense layer that only reorder its rows and columns
    features: np.ndarray | None = None  # for each of ``permuted``: the input features that meet the kernel's columns
    units: np.ndarray | None = None  # and the kernel row each output reads
    dense_source: bool = False  # a small dense layer on the source side: ``gathered`` are judged one at a time
    _gathers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def reordered(self, n: int, features: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """For a batch of ``n``: flat indices that gather every ``permuted`` mutant's inputs from ``(n, features)``
        as ``(mutants·n, features)`` rows, and its outputs from their product as ``(mutants, n, outputs)``."""
        found = self._gathers.get(n)
        if found is None:
            count, batch = len(self.permuted), np.arange(n)[None, :, None]
            rows = (batch * features + self.features[:, None, :]).reshape(count * n, features)
            picks = np.arange(count)[:, None, None] * (n * outputs) + batch * outputs + self.units[:, None, :]
            found = self._gathers[n] = (rows, picks)
        return found


def _reordering(source: DenseSpec, m: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """``(features, units)`` when ``m`` of a dense kernel only reorders its rows and columns: the layer it gives
    then computes ``(x[:, features] @ W.T)[:, units]`` with ``W`` the source kernel as ``(out, in)``; else None."""
    units_n, in_n = source.units, source.in_features
    idx = m.apply(np.arange(units_n * in_n, dtype=np.intp).reshape(source.kernel_shape))
    if idx.shape != source.kernel_shape:
        return None
    if source.kernel_layout == "IO":
        idx = idx.T
    row, col = (idx // in_n, idx % in_n) if source.kernel_layout == "OI" else (idx % units_n, idx // units_n)
    if not (np.array_equal(row, np.broadcast_to(row[:, :1], row.shape))
            and np.array_equal(col, np.broadcast_to(col[:1], col.shape))):
        return None
    cols = col[0]
    if not np.array_equal(np.sort(cols), np.arange(in_n)):
        return None
    return np.argsort(cols), row[:, 0].copy()


@functools.lru_cache(maxsize=16)  # an index is at most GATHER_MAX_KERNEL × mutants × 8 bytes
def _mutant_plan(source: LayerSpec, target: LayerSpec, right: Mapping, side: LayerSpec, on_source: bool) -> _MutantPlan:
    from equivcheck.mutations import mutants

    found = tuple(mutants(source, target, right))
    same = tuple(i for i, m in enumerate(found) if not m.ambiguous and m.target is None)
    maps = tuple(_back_to_source(found[i].mapping, right) if on_source else found[i].mapping for i in same)
    size = math.prod(source.kernel_shape)
    # A small dense layer on the source side: a mutant that only reorders the kernel's rows and columns is the
    # same kernel on reordered inputs, all of them in one product; any other is a view of the kernel, or a copy.
    dense_source = on_source and isinstance(source, DenseSpec) and side == source and size <= GATHER_MAX_KERNEL
    permuted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for j, m in enumerate(maps if dense_source else ()):
        order = _reordering(source, m)
        if order is not None:
            permuted[j] = order
    gathered = tuple(j for j in range(len(maps)) if j not in permuted)
    stack = _stacked(side, len(gathered)) if len(gathered) > 1 and not dense_source else None
    index = None
    if stack is not None and size <= GATHER_MAX_KERNEL:
        flat = np.arange(size, dtype=np.intp).reshape(source.kernel_shape)  # intp: numpy gathers fastest with it
        index = np.concatenate([maps[j].apply(flat) for j in gathered], axis=stack[1])
        index.setflags(write=False)
    features = units = None
    if permuted:
        features = np.stack([permuted[j][0] for j in permuted])
        units = np.stack([permuted[j][1] for j in permuted])
        features.setflags(write=False)
        units.setflags(write=False)
    return _MutantPlan(found, same, maps, stack, index, tuple(source.kernel_shape), gathered, tuple(permuted),
                       features, units, dense_source)


def _many(ref: Reference, kernel: np.ndarray, mplan: _MutantPlan) -> tuple[np.ndarray, np.ndarray]:
    """Exact outputs (no bias) and ``|W|·|x|`` of ``mplan``'s same-layer mutants of ``kernel`` on ``ref``'s batch,
    stacked on a new first axis: the reordering ones of a dense layer in one product on reordered inputs, the
    others as :func:`_dense_each` or :func:`_gathered` computes them."""
    if not mplan.permuted:
        return _dense_each(ref, kernel, mplan) if mplan.dense_source else _gathered(ref, kernel, mplan)
    spec = ref.spec
    kernel = np.asarray(kernel, np.float64)
    w, abs_w = kernel, ref.abs_kernel(kernel)
    if spec.kernel_layout != "OI":
        w, abs_w = w.T, abs_w.T

    def run(x64: np.ndarray, w: np.ndarray) -> np.ndarray:
        feats = dense_features(spec, x64)
        rows, picks = mplan.reordered(len(feats), feats.shape[1], w.shape[0])
        # every mutant's inputs, mutant by mutant: (count·n, in) @ (in, out), then each mutant's own output order
        y = np.take(np.take(feats, rows) @ w.T, picks)
        return np.stack([ref.adapt[1](p, ref.x) for p in y])

    ys, mags = run(ref.x64, w), run(ref.abs_x64, abs_w)
    if not mplan.gathered:
        return ys, mags
    gys, gmags = _dense_each(ref, kernel, mplan)
    out_y = np.empty((len(mplan.maps), *ys.shape[1:]))
    out_mag = np.empty_like(out_y)
    out_y[list(mplan.permuted)], out_mag[list(mplan.permuted)] = ys, mags
    out_y[list(mplan.gathered)], out_mag[list(mplan.gathered)] = gys, gmags
    return out_y, out_mag


def _dense_each(ref: Reference, kernel: np.ndarray, mplan: _MutantPlan) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_many` for the mutants in ``mplan.gathered`` of a dense layer on the source side, one at a time:
    each kernel (and its magnitude, from the kernel's own) is a view of the source kernel where it can be."""
    spec = ref.spec
    kernel = np.asarray(kernel, np.float64)
    abs_kernel = ref.abs_kernel(kernel)
    feats, abs_feats = dense_features(spec, ref.x64), dense_features(spec, ref.abs_x64)
    ys, mags = [], []
    for j in mplan.gathered:
        m = mplan.maps[j]
        w = _rearranged(m, kernel)
        # a view reads the kernel's own magnitudes; a copy takes its own (cheaper than a second strided copy)
        abs_w = _rearranged(m, abs_kernel) if np.may_share_memory(w, kernel) else np.abs(w)
        if spec.kernel_layout == "OI":
            w, abs_w = w.T, abs_w.T
        ys.append(ref.adapt[1](feats @ w, ref.x))
        mags.append(ref.adapt[1](abs_feats @ abs_w, ref.x))
    return np.stack(ys), np.stack(mags)


def _rearranged(m: Mapping, a: np.ndarray) -> np.ndarray:
    """``m.apply(a)``, a view where numpy can make one (a copy only where a reshape needs it)."""
    for op in m.simplify().ops:
        if isinstance(op, Reshape):
            a = a.reshape(op.shape)
        elif isinstance(op, Transpose):
            a = a.transpose(op.perm)
        else:
            a = a[tuple(slice(None, None, -1) if i in op.axes else slice(None) for i in range(a.ndim))]
    return a


def _gathered(ref: Reference, kernel: np.ndarray, mplan: _MutantPlan) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_many` for the mutants in ``mplan.gathered``: their kernels built, one forward each or all stacked."""
    maps = [mplan.maps[j] for j in mplan.gathered]
    if mplan.stack is None:
        kernels = [m.apply(kernel) for m in maps]
        return (np.stack([ref.forward(k, None) for k in kernels]),
                np.stack([ref.forward(k, None, absolute=True) for k in kernels]))
    spec, k_axis, y_axis = mplan.stack
    if mplan.index is not None and kernel.shape == mplan.kernel_shape:
        big = np.asarray(kernel, np.float64).reshape(-1)[mplan.index]  # one gather: every mutant kernel at once
    else:
        big = np.concatenate([np.asarray(m.apply(kernel), np.float64) for m in maps], axis=k_axis)
    y = reference_forward(spec, big, None, ref.x64)
    mag = reference_forward(spec, np.abs(big, out=big), None, ref.abs_x64)
    count = len(maps)
    return (np.stack([ref.adapt[1](p, ref.x) for p in _pieces(y, count, y_axis)]),
            np.stack([ref.adapt[1](p, ref.x) for p in _pieces(mag, count, y_axis)]))


def _pieces(y: np.ndarray, count: int, axis: int) -> np.ndarray:
    """``y`` cut into ``count`` equal parts along ``axis``, stacked first: views, where ``np.split`` makes a list."""
    axis %= y.ndim
    parts = y.reshape(*y.shape[:axis], count, y.shape[axis] // count, *y.shape[axis + 1:])
    return np.moveaxis(parts, axis, 0)


def mutant_outcomes(source: LayerSpec, target: LayerSpec, right: Mapping, kernel: np.ndarray,
                    bias: np.ndarray | None, ref: Reference,
                    right_outputs: tuple[np.ndarray, np.ndarray, np.ndarray | None],
                    source_ref: Reference | None = None) -> list[MutationOutcome]:
    """Each plausible wrong conversion of ``kernel``, judged on ``ref``'s batch (the target side's bound).

    Rejected where ``|y_mutant − y_right|`` (both exact) exceeds the right output's bound plus
    the mutant's own: a real layer within its bound then fails on it, whatever it rounds. A
    mutant of the target's own layer is computed on the source side (``source_ref``) through the
    inverse of the right mapping — the same function — with every such mutant in one stacked
    forward pass, and all of them judged in one pass over the stacked outputs.
    """
    if kernel.size > MUTANT_ROWS_KERNEL:
        on_rows = _on_rows(source, target, right, kernel, bias, ref, source_ref)
        if on_rows is not None:
            return on_rows
    exact, mag, nb = right_outputs
    bound = ref.bound(exact, mag, nb)
    target_bias = bias if target.bias else None  # the planned conversion never rearranges a bias
    side = source_ref or ref
    mplan = _mutant_plan(source, target, right, side.spec, side is not ref)
    found = mplan.found
    ratios: dict[int, float] = {}
    if mplan.same_layer:
        ys, mags = _many(side, kernel, mplan)
        if ys.shape[1:] != exact.shape:  # the wrong layer does not even give the right shape
            ratios.update(dict.fromkeys(mplan.same_layer, math.inf))
        else:
            nbs = None
            if target_bias is not None:
                if all(found[i].bias is None for i in mplan.same_layer):  # one bias for all: broadcast
                    b = _per_channel(target_bias, exact)[None]
                else:
                    b = np.stack([_per_channel(target_bias if found[i].bias is None else found[i].bias.apply(target_bias),
                                               exact) for i in mplan.same_layer])
                nbs, ys, mags = ys, ys + b, mags + np.abs(b)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.abs(ys - exact) / (bound + ref.bound(ys, mags, nbs))
            ratios.update(zip(mplan.same_layer, np.max(r.reshape(len(r), -1), axis=1, initial=0.0).tolist()))
    out = []
    for i, mutant in enumerate(found):
        convention = str(mutant.convention)
        if mutant.ambiguous or (mutant.bias is not None and bias is None):
            out.append(MutationOutcome(mutant.name, mutant.description, "ambiguous", convention=convention,
                                       mapping=mutant.mapping))
            continue
        if i not in ratios:  # another layer altogether (a padding mistake): its own forward
            b = target_bias if mutant.bias is None or target_bias is None else mutant.bias.apply(target_bias)
            try:
                got = ref.outputs(mutant.mapping.apply(kernel), b, spec=mutant.target)
            except EquivcheckError:
                got = None
            if got is None or got[0].shape != exact.shape:  # the wrong layer does not even give the right shape
                ratios[i] = math.inf
            else:
                y, m_mag, m_nb = got
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios[i] = float(np.max(np.abs(y - exact) / (bound + ref.bound(y, m_mag, m_nb)), initial=0.0))
        ratio = ratios[i]
        out.append(MutationOutcome(mutant.name, mutant.description, "rejected" if ratio > 1 else "not rejected",
                                   ratio, convention=convention, mapping=mutant.mapping))
    return out


#: Kernels larger than this have their mutants judged on :data:`MUTANT_ROWS` output channels (every weight of
#: those channels, on the whole batch): a stacked float64 copy of the whole kernel per mutant would not fit.
MUTANT_ROWS_KERNEL = 1 << 22
MUTANT_ROWS = 16


def _on_rows(source: LayerSpec, target: LayerSpec, right: Mapping, kernel: np.ndarray, bias: np.ndarray | None,
             ref: Reference, source_ref: Reference | None) -> list[MutationOutcome] | None:
    """:func:`mutant_outcomes` on a few output channels, spread over all of them (a mutant of the target's own
    layer on the source side, as there); None where a layer's outputs cannot be cut that way (groups,
    transposed convolutions)."""
    from equivcheck.mutations import mutants
    from equivcheck.planning import canonical

    if any(isinstance(s, ConvSpec) and (s.groups != 1 or s.transposed) for s in (source, target)):
        return None
    back = right.inverse()
    count = target.units if isinstance(target, DenseSpec) else target.out_channels
    rows = np.unique(np.linspace(0, count - 1, min(count, MUTANT_ROWS)).astype(int))
    b_rows = None if bias is None or not target.bias else np.asarray(bias)[rows]

    def cut(spec: LayerSpec | None, m: Mapping, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Exact outputs of the chosen channels of the target's layer (``spec`` None, on the source side where
        there is one) or of ``spec``, its kernel being ``m`` of the source kernel."""
        side, m = (source_ref, m.then(back)) if spec is None and source_ref is not None else (ref, m)
        spec = side.spec if spec is None else spec
        small = spec.replace(units=len(rows)) if isinstance(spec, DenseSpec) else spec.replace(out_channels=len(rows))
        canon = canonical(spec)
        coords = np.indices((len(rows), *canon.out_shape[1:]))
        coords[0] = rows[coords[0]]
        sub = kernel.reshape(-1)[m.then(canon).source_indices(tuple(coords))]
        return side.outputs(canonical(small).inverse().apply(sub), b, spec=small)

    exact, mag, nb = cut(None, right, b_rows)
    bound = ref.bound(exact, mag, nb)
    out = []
    for mutant in mutants(source, target, right):
        convention = str(mutant.convention)
        if mutant.ambiguous or (mutant.bias is not None and b_rows is None):
            out.append(MutationOutcome(mutant.name, mutant.description, "ambiguous", convention=convention,
                                       mapping=mutant.mapping))
            continue
        b = b_rows if mutant.bias is None else mutant.bias.apply(np.asarray(bias))[rows]
        try:
            y, m_mag, m_nb = cut(mutant.target, mutant.mapping, b)
        except EquivcheckError:
            y = None
        if y is None or y.shape != exact.shape:
            out.append(MutationOutcome(mutant.name, mutant.description, "rejected", math.inf, convention=convention,
                                       mapping=mutant.mapping))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.max(np.abs(y - exact) / (bound + ref.bound(y, m_mag, m_nb)), initial=0.0))
        out.append(MutationOutcome(mutant.name, mutant.description, "rejected" if ratio > 1 else "not rejected",
                                   ratio, convention=convention, mapping=mutant.mapping))
    return out


@functools.lru_cache(maxsize=1024)
def _back_to_source(wrong: Mapping, right: Mapping) -> Mapping:
    """The source kernel the target's layer computes with under ``wrong``: ``wrong`` then the inverse of ``right``."""
    return wrong.then(right.inverse()).simplify()


def _per_channel(bias: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``bias`` shaped to add to a canonical output ``(N, C, ...)`` or ``(N, C)``."""
    b = np.asarray(bias, np.float64)
    return b.reshape(1, -1, *(1,) * (y.ndim - 2)) if b.size == y.shape[1] else b.reshape(1, -1)


# -- mutants of a pair replayed on captured data (a whole-model check) ----------------------------
#: Kernels larger than this are judged on a twin: the same structure on fewer channels (and a corner of a dense map).
MUTANT_MAX_KERNEL = 1 << 18
#: Output positions per axis (a crop of the map) and samples the mutants of a replayed conv are judged on.
MUTANT_POSITIONS = 4
MUTANT_SAMPLES = 4
#: Outputs per sample above which a transposed convolution's mutants are not replayed (it has no crop).
MUTANT_MAX_TRANSPOSED_OUTPUTS = 1 << 16


def replayed_mutants(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
                     x_canonical: np.ndarray, *, dtype: str, fan: int,
                     accumulate: tuple[str, str] = ("", "")) -> tuple[list[MutationOutcome], str]:
    """Each mutant of a pair replayed on captured data, judged as :func:`mutant_outcomes` judges them, against
    the two layers' bounds together (the converted layer is judged against its real partner): ``(outcomes,
    why none were judged or "")``. A large layer is judged on a twin cut from its kernel and input (fewer
    channels), a large map on a crop of output positions (the real layer's own outputs there, padding
    included); a mutant that changes the layer's padding is not judged on a crop.
    """
    smaller = _twin(source, target, kernel, bias, x_canonical) if kernel.size > MUTANT_MAX_KERNEL else \
        (source, target, kernel, bias, x_canonical)
    if smaller is None:
        return [], "mutants not replayed: the kernel is too large and its grouping has no smaller twin"
    source, target, kernel, bias, x = smaller
    x = x[:MUTANT_SAMPLES]
    if isinstance(source, ConvSpec) and source.transposed:
        if math.prod(source.output_shape) > MUTANT_MAX_TRANSPOSED_OUTPUTS:
            return [], "mutants not replayed: the transposed convolution's map is too large"
    elif isinstance(source, ConvSpec) and isinstance(target, ConvSpec):
        source, target, x = _cropped(source, target, x)
    try:
        right = plan(source, target)
    except EquivcheckError as exc:
        return [], f"mutants not replayed: {exc}"
    ones = max(1, min(fan, fan_in(source)))
    src = Reference(source, target, x, dtype=dtype, fan=ones, accumulate=accumulate)
    tgt = Reference(target, source, x, dtype=dtype, fan=ones, accumulate=accumulate)
    return mutant_outcomes(source, target, right, kernel, bias, tgt, src.outputs(kernel, bias), src), ""


def _cropped(source: ConvSpec, target: ConvSpec, x: np.ndarray) -> tuple[ConvSpec, ConvSpec, np.ndarray]:
    """The pair on the input region behind a central crop of at most :data:`MUTANT_POSITIONS` outputs per
    axis, padded as the layer pads it: the same outputs there, as a layer of its own with no padding."""
    out = source.output_spatial
    if all(o <= MUTANT_POSITIONS for o in out):
        return source, target, x
    xp = np.pad(x, [(0, 0), (0, 0), *source.pads()])
    starts = [max(0, (o - MUTANT_POSITIONS) // 2) for o in out]
    sizes = [min(o, MUTANT_POSITIONS) for o in out]
    span = [d * (k - 1) + 1 for k, d in zip(source.kernel_size, source.dilation)]
    region = tuple(slice(a * s, (a + n - 1) * s + sp) for a, n, s, sp in zip(starts, sizes, source.stride, span))
    spatial = tuple(r.stop - r.start for r in region)
    try:
        cut_source = source.replace(spatial=spatial, padding="valid")
        cut_target = target.replace(spatial=spatial, padding="valid")
    except EquivcheckError:
        return source, target, x
    return cut_source, cut_target, np.ascontiguousarray(xp[(slice(None), slice(None), *region)])


def _twin(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
          x_canonical: np.ndarray) -> tuple | None:
    """A smaller layer pair of the same structure, its kernel and input cut from the real ones.

    The canonical kernel's first output channels, and its first input channels (a dense
    layer: and a corner of its map), make a layer of their own on the same cut of the input.
    """
    from equivcheck.planning import canonical

    to_canon = canonical(source)
    out_shape = to_canon.out_shape
    units = min(out_shape[0], 16)
    try:
        if isinstance(source, DenseSpec):
            c = min(source.channels, 8)
            spatial = tuple(min(n, 4) for n in source.spatial)
            s_twin = source.replace(channels=c, spatial=spatial, units=units)
            t_twin = target.replace(channels=c, spatial=spatial, units=units) if isinstance(target, DenseSpec) else \
                target.replace(in_channels=c, out_channels=units, kernel_size=spatial or target.kernel_size,
                               spatial=spatial or target.spatial)
            cut = (slice(0, units), slice(0, c), *(slice(0, n) for n in spatial))
            xcut = x_canonical[(slice(None), slice(0, c), *(slice(0, n) for n in spatial))] if spatial else \
                x_canonical[:, :c]
        else:
            g = source.groups
            if g not in (1, source.in_channels) or source.transposed:
                return None
            c = min(source.in_channels, 8)
            if g == 1:
                changes = dict(in_channels=c, out_channels=units)
                cut = (slice(0, units), slice(0, c))
            else:  # depthwise: whole channels with all their multiplier outputs
                mult = source.out_channels // source.in_channels
                changes = dict(in_channels=c, out_channels=c * mult, groups=c)
                cut = (slice(0, c * mult), slice(None))
            s_twin, t_twin = source.replace(**changes), target.replace(**changes)
            xcut = x_canonical[:, :c]
        rows = cut[0].stop or out_shape[0]
        coords = np.indices((rows, *out_shape[1:]))
        sub = kernel.reshape(-1)[to_canon.source_indices(tuple(coords))][(slice(None), *cut[1:])]
        k_twin = canonical(s_twin).inverse().apply(np.ascontiguousarray(sub))
    except (EquivcheckError, ValueError):
        return None
    b_twin = None if bias is None or not s_twin.bias else bias[:rows]
    return s_twin, t_twin, k_twin, b_twin, np.ascontiguousarray(xcut)

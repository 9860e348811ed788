"""Check a user's weight converter on real layers: the logic behind the pytest fixture.

    from equivcheck.checker import Checker
    Checker().check_converter(my_convert, source="keras:dense", target="torch:conv",
                              channels=8, spatial=(5, 6), units=3)

``my_convert(kernel, bias)`` takes the source layer's weights as numpy arrays in the source
framework's own layout and returns the target's ``(kernel, bias)``. Each check draws weights
and inputs (:mod:`equivcheck.strategies`), runs the source layer on its own framework and
the target layer with the converted weights on its own, and judges both against the exact
result (:mod:`equivcheck.compare`). Shape arguments given as ranges (``channels=(1, 8)``) or
hypothesis strategies start a hypothesis search that shrinks a failure to the smallest case.
A failure raises :class:`ConversionCheckFailed` (an ``AssertionError``) whose message names
the case, the conventions the converter actually follows and code that reproduces it.
Usable without pytest; importing this module imports no deep-learning framework.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from equivcheck._arrays import to_numpy
from equivcheck.errors import CheckSkipped, ConversionCheckFailed, EquivcheckError, NoMapping, SpecError
from equivcheck.identify import IDENTIFY_MAX_ELEMENTS, Identification, identify, preset_kwargs, probe_weights
from equivcheck.plan import plan
from equivcheck.presets import PRESETS, backend_of, build, spec
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec
from equivcheck.verify import Case

__all__ = [
    "PRESET_BACKENDS",
    "CheckRecord",
    "CheckSkipped",
    "Checker",
    "Conventions",
    "ConversionCheckFailed",
    "Options",
    "check_conversion",
    "derive_seed",
    "identify_conventions",
    "resolve_backend",
    "spec_code",
]

#: The framework that runs each preset's layers (from :data:`equivcheck.presets.PRESETS`); the others run on numpy.
PRESET_BACKENDS = {name: p.backend for name, p in PRESETS.items() if p.backend != "numpy"}
_INT_ARGS = ("channels", "units", "groups", "multiplier")


@dataclass(frozen=True)
class Options:
    """Run-wide settings (the pytest options ``--equivcheck-*``)."""

    backends: tuple[str, ...] | None = None  # frameworks allowed to run layers; None: every installed one
    max_examples: int = 20
    seed: int = 0
    dtypes: tuple[str, ...] = ("float32",)

    def __post_init__(self) -> None:
        from equivcheck.backends.base import np_dtype

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


# -- conventions -------------------------------------------------------------------------
#: What a converter's kernel is (kept under its old name): see :class:`equivcheck.identify.Identification`.
Conventions = Identification


def _label(layer: LayerSpec) -> str:
    return layer.name or layer.kind


def spec_code(layer: LayerSpec) -> str:
    """Python that rebuilds ``layer`` (with ``import equivcheck as ec``)."""
    name = layer.name or ""
    if name.count(":") == 1 and name.split(":")[0] in PRESETS:
        kw = preset_kwargs(layer)
        try:
            if spec(name, **kw) == layer:
                args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
                return f"ec.spec({name!r}, {args})"
        except EquivcheckError:
            pass
    return f"ec.{layer!r}"


def identify_conventions(convert: Callable, source: LayerSpec, target: LayerSpec) -> Identification:
    """Name the conventions ``convert`` follows, by converting all-distinct probe weights (:func:`equivcheck.identify`)."""
    label = _label(target)
    if math.prod(source.kernel_shape) > IDENTIFY_MAX_ELEMENTS:
        return Identification(label, problem=f"not identified: the kernel has more than {IDENTIFY_MAX_ELEMENTS} weights")
    kernel, bias = probe_weights(source)
    try:
        result = convert(kernel.copy(), None if bias is None else bias.copy())
        got = np.asarray(to_numpy(result[0]), dtype=np.float64)
        got_bias = None if result[1] is None else np.asarray(to_numpy(result[1]), dtype=np.float64)
    except Exception as exc:  # the user's converter may not accept probe values; say so, do not hide the check
        return Identification(label, problem=f"not identified: the converter raised {type(exc).__name__} on probe weights")
    return identify(source, target, got, got_bias, source_kernel=kernel, source_bias=bias)


# -- one check ---------------------------------------------------------------------------
def _input_spec(source: LayerSpec, target: LayerSpec) -> LayerSpec:
    if isinstance(source, DenseSpec) and source.rank == 0 and isinstance(target, ConvSpec):
        return target
    return source


def check_conversion(
    convert: Callable,
    source: LayerSpec,
    target: LayerSpec,
    *,
    source_backend: str = "numpy",
    target_backend: str = "numpy",
    dtype: str = "float32",
    seed: int = 0,
    batch: int | None = None,
) -> Case:
    """One check of ``convert`` on data drawn from ``seed``; a :class:`Case`, never raises for a failed check.

    A converter that returns the wrong shapes gives a failed case saying so.
    """
    from equivcheck.errors import VerificationError
    from equivcheck.strategies import sample_inputs, sample_weights
    from equivcheck.verify import verify_pair

    rng = np.random.default_rng(seed)
    kernel, bias = sample_weights(source, dtype, rng)
    x = sample_inputs(_input_spec(source, target), batch, dtype, rng)
    try:
        return verify_pair(source, target, source_backend=source_backend, target_backend=target_backend,
                           dtype=dtype, converter=convert, seed=seed, data=(kernel, bias, x))
    except VerificationError as exc:
        case = Case(source, target, source_backend, target_backend, dtype, "fail", seed=seed)
        case.reason = str(exc)
        with contextlib.suppress(NoMapping):
            case.mapping = plan(source, target)
        return case


@dataclass
class CheckRecord:
    """One checked case with what the checker learned about the converter."""

    case: Case
    test: str = ""
    converter: str = ""
    notes: list[str] = field(default_factory=list)
    identify: Callable[[], str] | None = field(default=None, repr=False)  # names the conventions, on demand
    _conventions: str | None = field(default=None, repr=False)

    @property
    def conventions(self) -> str:
        """What the converter's kernel is (computed once, only for records that are kept)."""
        if self._conventions is None:
            self._conventions = self.identify() if self.identify is not None else ""
        return self._conventions

    @property
    def failed(self) -> bool:
        return self.case.verdict in ("fail", "error", "inconclusive")

    def summary(self) -> dict[str, Any]:
        """A small JSON-able row for the terminal summary."""
        c = self.case
        return {"test": self.test, "converter": self.converter, "conversion": c.title(),
                "backends": f"{c.source_backend} → {c.target_backend}", "dtype": c.dtype,
                "verdict": c.verdict, "conventions": self.conventions, "notes": list(self.notes)}

    def report_record(self) -> dict[str, Any]:
        """The report's case record plus the test, converter, conventions and notes."""
        from equivcheck.report.records import case_record

        record = case_record(self.case)
        record.pop("id", None)
        record.update(test=self.test, converter=self.converter, conventions=self.conventions, notes=list(self.notes))
        return case_record(record)


def _callable_name(convert: Callable) -> tuple[str, str]:
    """(display name, import line) of a converter."""
    name = getattr(convert, "__qualname__", None) or getattr(convert, "__name__", None) or type(convert).__name__
    if "<locals>" in name:  # a function defined inside a test: its plain name
        return getattr(convert, "__name__", name), f"# define {getattr(convert, '__name__', name)} as in your test"
    module = getattr(convert, "__module__", None)
    if module and "<" not in name and module != "__main__":
        return name, f"from {module} import {name.split('.')[0]}"
    return name, f"# define {name} as in your test"


def failure_message(record: CheckRecord, convert: Callable, *, call: str | None = None) -> str:
    """The assertion message: the case, what went wrong, the conventions found and a reproducer.

    ``call`` is the converter expression of the reproducer (default: ``convert``'s name).
    """
    c = record.case
    name, import_line = _callable_name(convert)
    lines = [
        f"{name} does not convert {c.title()} correctly ({c.verdict})",
        f"  source     {c.source.describe()}",
        f"  target     {c.target.describe()}",
        f"  run on     {c.source_backend} → {c.target_backend}, {c.dtype}, seed={c.seed}",
        f"  result     {c.reason or (c.comparison.summary() if c.comparison else '')}",
        f"  converter  {record.conventions}",
    ]
    if c.mapping is not None:
        lines.append(f"  right      {c.mapping.code('numpy')}")
    lines += [f"  note       {n}" for n in record.notes]
    lines += [
        "  reproduce:",
        "    import equivcheck as ec",
        "    from equivcheck.checker import check_conversion",
        f"    {import_line}",
        f"    source = {spec_code(c.source)}",
        f"    target = {spec_code(c.target)}",
        f"    case = check_conversion({call or name.split('.')[0]}, source, target, source_backend={c.source_backend!r}, "
        f"target_backend={c.target_backend!r}, dtype={c.dtype!r}, seed={c.seed})",
        "    print(case.verdict, case.reason)",
    ]
    return "\n".join(lines)


# -- shape arguments ---------------------------------------------------------------------
def _is_strategy(value: Any) -> bool:
    from hypothesis.strategies import SearchStrategy

    return isinstance(value, SearchStrategy)


def _int_range(name: str, value: Any) -> Any:
    """A fixed int, or a strategy for a ``(lo, hi)`` range, a ``range`` or a strategy."""
    from hypothesis import strategies as st

    if _is_strategy(value):
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

    if _is_strategy(value) or not isinstance(value, (tuple, list)):
        return value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    parts = [_int_range(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return st.tuples(*(p if _is_strategy(p) else st.just(p) for p in parts))


def _split_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed values, strategies) of the shape arguments."""
    fixed, varying = {}, {}
    for key, value in args.items():
        v = _int_range(key, value) if key in _INT_ARGS else _axes(key, value) if key != "bias" else value
        (varying if _is_strategy(v) else fixed)[key] = v
    return fixed, varying


def _build(name: Any, args: dict[str, Any], role: str) -> LayerSpec:
    if isinstance(name, (DenseSpec, ConvSpec)):
        return name
    if not isinstance(name, str):
        raise SpecError(f"{role}={name!r} is not a layer: expected 'PRESET:LAYER' (e.g. 'keras:dense') or a spec")
    return build(name, **{k: v for k, v in args.items() if v is not None})


# -- the checker -------------------------------------------------------------------------
class Checker:
    """Checks converters and records every case (for the pytest summary and report).

    ``test`` names the caller (a pytest node id) and salts the seeds, so results do not
    depend on test order or on which pytest-xdist worker runs the test.
    """

    def __init__(self, options: Options | None = None, *, test: str = "", pair_defaults: dict[str, Any] | None = None) -> None:
        self.options = options or Options()
        self.test = test
        self.pair_defaults = dict(pair_defaults or {})
        self.records: list[CheckRecord] = []
        self._calls = 0

    def _seed(self, seed: int | None) -> int:
        self._calls += 1
        return derive_seed(self.options.seed if seed is None else seed, self.test, self._calls)

    # -- one converter, one layer pair --------------------------------------------------
    def check_converter(
        self,
        convert: Callable,
        source: str | LayerSpec,
        target: str | LayerSpec,
        *,
        channels: Any = None,
        spatial: Any = (),
        units: Any = None,
        kernel_size: Any = None,
        stride: Any = 1,
        dilation: Any = 1,
        padding: Any = "valid",
        groups: Any = 1,
        bias: Any = True,
        multiplier: Any = None,
        output_padding: Any = 0,
        dtypes: Sequence[str] | str | None = None,
        max_examples: int | None = None,
        seed: int | None = None,
    ) -> list[Case]:
        """Check ``convert(kernel, bias) -> (kernel, bias)`` from ``source`` to ``target``.

        ``source``/``target``: ``"PRESET:LAYER"`` names (or specs). Shape arguments are those of
        :func:`equivcheck.spec`; an int argument given as ``(low, high)`` or a ``range``, a
        tuple argument with a range per axis, or any hypothesis strategy, makes this a search
        over shapes with ``max_examples`` examples. Raises :class:`ConversionCheckFailed` on a
        failure (the shrunk case) and :class:`CheckSkipped` when nothing could run.
        """
        __tracebackhide__ = True  # pytest shows the message, not this frame
        if not callable(convert):
            raise SpecError(f"convert={convert!r} is not callable: expected a function (kernel, bias) -> (kernel, bias)")
        args = dict(channels=channels, spatial=spatial, units=units, kernel_size=kernel_size, stride=stride,
                    dilation=dilation, padding=padding, groups=groups, multiplier=multiplier,
                    output_padding=output_padding, bias=bias)
        fixed, varying = _split_args(args)
        names = self._dtypes(dtypes)
        run_seed = self._seed(seed)
        if not varying:
            src, dst = _build(source, fixed, "source"), _build(target, fixed, "target")
            plan(src, dst)  # a pair that no conversion can make equivalent is an error, not a failure
            cases = []
            for dtype in names:
                record = self._run(convert, src, dst, dtype, derive_seed(run_seed, dtype))
                cases.append(record.case)
                if record.failed:
                    raise ConversionCheckFailed(failure_message(record, convert), record)
            return self._done(cases)

        from hypothesis import strategies as st

        def example(draw: Any) -> tuple[LayerSpec, LayerSpec, str, int]:
            shape = {**fixed, **{k: draw(v) for k, v in varying.items()}}
            try:
                src, dst = _build(source, shape, "source"), _build(target, shape, "target")
                plan(src, dst)
            except EquivcheckError:
                from hypothesis import reject

                reject()
            return src, dst, draw(st.sampled_from(names)), draw(st.integers(0, 2**32 - 1))

        return self._search(convert, st.composite(example)(), max_examples, run_seed, pairs=False)

    # -- a generic converter over generated pairs -----------------------------------------
    def check_pairs(
        self,
        convert: Callable,
        *,
        dtypes: Sequence[str] | str | None = None,
        max_examples: int | None = None,
        seed: int | None = None,
        **pair_options: Any,
    ) -> list[Case]:
        """Check ``convert(source, target, kernel, bias) -> (kernel, bias)`` on generated spec pairs.

        ``pair_options`` go to :func:`equivcheck.strategies.spec_pairs` (``kinds``, ``presets``,
        ``min_*``/``max_*``), after the defaults of the test's ``equivcheck`` marker.
        """
        __tracebackhide__ = True
        from hypothesis import strategies as st

        from equivcheck.strategies import spec_pairs

        if not callable(convert):
            raise SpecError(f"convert={convert!r} is not callable: expected (source, target, kernel, bias) -> (kernel, bias)")
        pairs = spec_pairs(**{**self.pair_defaults, **pair_options})
        names = self._dtypes(dtypes)
        strategy = st.tuples(pairs, st.sampled_from(names), st.integers(0, 2**32 - 1)).map(
            lambda t: (t[0][0], t[0][1], t[1], t[2]))
        return self._search(convert, strategy, max_examples, self._seed(seed), pairs=True)

    # -- internals -------------------------------------------------------------------------
    def check_model_converter(self, convert: Callable[[Any], Any], source: Any, **options: Any) -> Any:
        """Convert a whole model and check it layer by layer: :func:`equivcheck.modelcheck.check_model_converter`."""
        __tracebackhide__ = True
        from equivcheck.modelcheck.converter import check_model_converter

        options.setdefault("seed", self._seed(options.get("seed")))
        return check_model_converter(convert, source, **options)

    def _dtypes(self, dtypes: Sequence[str] | str | None) -> tuple[str, ...]:
        from equivcheck.backends.base import np_dtype

        names = self.options.dtypes if dtypes is None else (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
        if not names:
            raise SpecError("dtypes=() is empty: expected at least one dtype, e.g. ('float32',)")
        for d in names:
            np_dtype(d)
        return names

    def _run(self, convert: Callable, source: LayerSpec, target: LayerSpec, dtype: str, seed: int) -> CheckRecord:
        allowed = self.options.backends
        (sb, snote), (tb, tnote) = (resolve_backend(s, dtype, allowed) for s in (source, target))
        case = check_conversion(convert, source, target, source_backend=sb, target_backend=tb, dtype=dtype, seed=seed)
        record = CheckRecord(case, test=self.test, converter=_callable_name(convert)[0],
                             notes=[n for n in (snote, tnote) if n])
        if case.verdict != "skip":
            record.identify = lambda: identify_conventions(convert, source, target).summary()
        self.records.append(record)
        return record

    def _search(self, convert: Callable, strategy: Any, max_examples: int | None, seed: int, *, pairs: bool) -> list[Case]:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed

        __tracebackhide__ = True
        before = len(self.records)
        name = _callable_name(convert)[0]

        def run(example: tuple[LayerSpec, LayerSpec, str, int]) -> None:
            __tracebackhide__ = True
            src, dst, dtype, data_seed = example

            def generic(k: Any, b: Any) -> Any:
                return convert(src, dst, k, b)

            record = self._run(generic if pairs else convert, src, dst, dtype, data_seed)
            record.converter = name
            if record.failed:
                call = f"lambda k, b: {name.split('.')[0]}(source, target, k, b)" if pairs else None
                raise ConversionCheckFailed(failure_message(record, convert, call=call), record)

        limit = max_examples or self.options.max_examples
        phases = [p for p in Phase if p.name != "explain"]  # the failure message already explains
        search = settings(max_examples=limit, deadline=None, database=None, derandomize=False, phases=phases,
                          report_multiple_bugs=False, print_blob=False,
                          suppress_health_check=list(HealthCheck))(hypothesis_seed(seed)(given(strategy)(run)))
        try:
            search()
        except ConversionCheckFailed:
            # Keep only the shrunk case, which hypothesis replays last.
            self.records[before:] = self.records[-1:]
            raise
        return self._done([r.case for r in self.records[before:]])

    def _done(self, cases: list[Case]) -> list[Case]:
        if cases and all(c.verdict == "skip" for c in cases):
            raise CheckSkipped(f"nothing was checked: {cases[0].reason}")
        return cases


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


_COLUMNS = ("conversion", "converter", "backends", "dtype", "checked", "verdicts", "conventions")


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Text lines of a table of the checks: one line per conversion, converter, backend pair and dtype."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["conversion"], row["converter"], row["backends"], row["dtype"])
        g = groups.setdefault(key, {"checked": 0, "verdicts": {}, "conventions": []})
        g["checked"] += 1
        g["verdicts"][row["verdict"]] = g["verdicts"].get(row["verdict"], 0) + 1
        if row["conventions"] and row["conventions"] not in g["conventions"]:
            g["conventions"].append(row["conventions"])
    table = [list(_COLUMNS)]
    for key, g in groups.items():
        verdicts = " ".join(f"{n} {v}" for v, n in sorted(g["verdicts"].items()))
        table.append([*key[:4], str(g["checked"]), verdicts, "; ".join(g["conventions"]) or "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in table]
    notes = dict.fromkeys(n for row in rows for n in row.get("notes", ()))
    return lines + [f"note: {n}" for n in notes]

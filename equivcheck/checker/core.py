"""The checker: one conversion on real layers, a record of it, and searches over shapes and spec pairs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from equivcheck.checker.arguments import build_side, is_strategy, sequence_pair, split_args
from equivcheck.checker.messages import converter_code, converter_patch, failure_message, identify_conventions
from equivcheck.checker.options import Options, derive_seed, resolve_backend
from equivcheck.errors import (
    CheckSkipped,
    ConversionCheckFailed,
    EquivcheckError,
    NoMapping,
    SpecError,
    framework_message,
)
from equivcheck.judge import Case, judge_pair
from equivcheck.planning import plan
from equivcheck.specs import LayerSpec


# -- one check ---------------------------------------------------------------------------
class _Raised(Exception):
    """An exception raised by the user's converter itself (its ``__cause__``), told apart from equivcheck's own."""


class _Guarded:
    """The user's converter, its exceptions wrapped in :class:`_Raised`."""

    def __init__(self, convert: Callable) -> None:
        self.convert = convert

    def __call__(self, *args: Any) -> Any:
        try:
            return self.convert(*args)
        except Exception as exc:
            raise _Raised(str(exc)) from exc


def _side(args: dict[str, Any], role: str) -> dict[str, Any]:
    """The shape arguments plus ``role``'s own spec options (keys ``"source:flatten"`` → ``flatten``)."""
    prefix = f"{role}:"
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in args.items()
            if ":" not in k or k.startswith(prefix)}


def native_inputs(convert: Callable, backend: str, dtype: str) -> Callable:
    """``convert`` handed ``backend``'s own tensors in ``dtype`` instead of numpy arrays."""
    from equivcheck import backends as registry

    framework = registry.get(backend)

    @functools.wraps(convert)
    def native(kernel: Any, bias: Any) -> Any:
        return convert(framework.tensor(kernel, dtype), None if bias is None else framework.tensor(bias, dtype))

    return native


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
    identify_with: Callable[[], Any] | None = None,
) -> Case:
    """One check of ``convert`` on data drawn from ``seed``; a :class:`Case`, never raises for a failed check.

    The judge (:func:`equivcheck.judge.judge_pair`) draws the data from the backends' probed
    facts. A converter that returns the wrong shapes gives a failed case saying so.
    """
    from equivcheck.errors import VerificationError

    try:
        return judge_pair(source, target, source_backend=source_backend, target_backend=target_backend,
                          dtype=dtype, converter=convert, seed=seed, batch=batch, identify_with=identify_with)
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
    def patch(self) -> list[str]:
        """A failed case's fix, as lines to paste in the target framework (:func:`converter_patch`); [] otherwise."""
        case = self.case
        if case.verdict != "fail" or case.mapping is None:
            return []
        return converter_patch(case.source, case.target, case.mapping)

    @property
    def failed(self) -> bool:
        return self.case.verdict in ("fail", "error", "inconclusive")

    def summary(self) -> dict[str, Any]:
        """A small JSON-able row for the terminal summary."""
        c = self.case
        return {"test": self.test, "converter": self.converter, "conversion": c.title(),
                "backends": f"{c.source_backend} → {c.target_backend}", "dtype": c.dtype,
                "verdict": c.verdict, "conventions": self.conventions, "notes": list(self.notes)}

    def details(self) -> dict[str, Any]:
        """What the checker adds to the case's report record: the test, converter, conventions and notes."""
        return {"test": self.test, "converter": self.converter, "conventions": self.conventions,
                "notes": list(self.notes), **({"patch": self.patch} if self.patch else {})}


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
        native: bool = False,
        source_options: dict[str, Any] | None = None,
        target_options: dict[str, Any] | None = None,
        input_size: Any = None,
        embed_dim: Any = None,
        heads: Any = None,
        head_dim: Any = None,
        bidirectional: bool = False,
        reset_after: bool | None = None,
    ) -> list[Case]:
        """Check ``convert(kernel, bias) -> (kernel, bias)`` from ``source`` to ``target``.

        ``source_options``/``target_options`` set one layer's spec fields beyond its preset
        (``{"flatten": "HWC", "kernel_layout": "OI"}``); a value given as a list, or a strategy,
        is searched over like a shape range.

        ``source``/``target``: ``"PRESET:LAYER"`` names (or specs). Shape arguments are those of
        :func:`equivcheck.spec`; an int argument given as ``(low, high)`` or a ``range``, a
        tuple argument with a range per axis, or any hypothesis strategy, makes this a search
        over shapes with ``max_examples`` examples. Raises :class:`ConversionCheckFailed` on a
        failure (the shrunk case) and :class:`CheckSkipped` when nothing could run.

        ``convert`` receives numpy arrays in the case's dtype (bfloat16 as ``ml_dtypes.bfloat16``);
        with ``native=True``, the source framework's own tensors in its own dtype (``torch.Tensor``,
        ``tf.Tensor``, ``jax.Array``; numpy for the reference, scipy, ONNX Runtime and TFLite). It
        may return numpy arrays or any framework's tensors.

        Recurrent and attention layers (``"torch:lstm"``, ``"keras:mha"`` …, sized by ``input_size``,
        ``units``, ``bidirectional``, ``reset_after`` or ``embed_dim``, ``heads``, ``head_dim``):
        ``convert(weights) -> weights``, dicts of tensors keyed by each framework's parameter names.
        """
        __tracebackhide__ = True  # pytest shows the message, not this frame
        if not callable(convert):
            raise SpecError(f"convert={convert!r} is not callable: expected a function (kernel, bias) -> (kernel, bias)")
        sequence = sequence_pair(source, target, dict(input_size=input_size, units=units, embed_dim=embed_dim, heads=heads,
                                                      head_dim=head_dim, bidirectional=bidirectional, reset_after=reset_after))
        if sequence is not None:
            return self._check_sequence(convert, *sequence, dtypes, seed, native)
        args = dict(channels=channels, spatial=spatial, units=units, kernel_size=kernel_size, stride=stride,
                    dilation=dilation, padding=padding, groups=groups, multiplier=multiplier,
                    output_padding=output_padding, bias=bias)
        fixed, varying = split_args(args)
        sides = {"source": dict(source_options or {}), "target": dict(target_options or {})}
        for role, options in sides.items():
            for key, value in options.items():
                if isinstance(value, list):
                    from hypothesis import strategies as st

                    value = st.sampled_from(value)
                (varying if is_strategy(value) else fixed)[f"{role}:{key}"] = value
        names = self._dtypes(dtypes)
        run_seed = self._seed(seed)
        if not varying:
            src, dst = build_side(source, _side(fixed, "source"), "source"), build_side(target, _side(fixed, "target"), "target")
            plan(src, dst)  # a pair that no conversion can make equivalent is an error, not a failure
            cases = []
            for dtype in names:
                record = self._run(convert, src, dst, dtype, derive_seed(run_seed, dtype), native=native)
                cases.append(record.case)
                if record.failed:
                    raise ConversionCheckFailed(failure_message(record, convert), record)
            return self._done(cases)

        from hypothesis import strategies as st

        def example(draw: Any) -> tuple[LayerSpec, LayerSpec, str, int]:
            shape = {**fixed, **{k: draw(v) for k, v in varying.items()}}
            try:
                src, dst = build_side(source, _side(shape, "source"), "source"), build_side(target, _side(shape, "target"), "target")
                plan(src, dst)
            except EquivcheckError:
                from hypothesis import reject

                reject()
            return src, dst, draw(st.sampled_from(names)), draw(st.integers(0, 2**32 - 1))

        return self._search(convert, st.composite(example)(), max_examples, run_seed, pairs=False, native=native)

    # -- a generic converter over generated pairs -----------------------------------------
    def check_pairs(
        self,
        convert: Callable,
        *,
        dtypes: Sequence[str] | str | None = None,
        max_examples: int | None = None,
        seed: int | None = None,
        native: bool = False,
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
        return self._search(convert, strategy, max_examples, self._seed(seed), pairs=True, native=native)

    # -- internals -------------------------------------------------------------------------
    def check_model_converter(self, convert: Callable[[Any], Any], source: Any, **options: Any) -> Any:
        """Convert a whole model and check it layer by layer: :func:`equivcheck.modelcheck.check_model_converter`."""
        __tracebackhide__ = True
        from equivcheck.modelcheck.converter import check_model_converter

        options.setdefault("seed", self._seed(options.get("seed")))
        return check_model_converter(convert, source, **options)

    def _dtypes(self, dtypes: Sequence[str] | str | None) -> tuple[str, ...]:
        from equivcheck.dtypes import np_dtype

        names = self.options.dtypes if dtypes is None else (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
        if not names:
            raise SpecError("dtypes=() is empty: expected at least one dtype, e.g. ('float32',)")
        for d in names:
            np_dtype(d)
        return names

    def _run(self, convert: Callable, source: LayerSpec, target: LayerSpec, dtype: str, seed: int, *,
             native: bool = False) -> CheckRecord:
        allowed = self.options.backends
        (sb, snote), (tb, tnote) = (resolve_backend(s, dtype, allowed) for s in (source, target))
        name = converter_code(convert)[0]  # before any wrapping: a partial keeps its function and arguments
        if native:
            convert = native_inputs(convert, sb, dtype)
        def conventions() -> Any:
            return identify_conventions(convert, source, target)

        try:
            case = check_conversion(_Guarded(convert), source, target, source_backend=sb, target_backend=tb,
                                    dtype=dtype, seed=seed, identify_with=conventions)
        except _Raised as exc:  # the converter's own error: a recorded case, never a lost one
            case = Case(source, target, sb, tb, dtype, "error", seed=seed,
                        reason=f"the converter raised {framework_message(exc.__cause__ or exc)}")
        except EquivcheckError as exc:  # what it returned was refused, or the layers could not run: recorded too
            case = Case(source, target, sb, tb, dtype, "error", seed=seed, reason=str(exc))
        record = CheckRecord(case, test=self.test, converter=name,
                             notes=[n for n in (snote, tnote) if n])
        if case.identification is not None:  # the judge named the failure once: no second identification
            record.identify = case.identification.summary
        elif case.verdict != "skip":
            record.identify = lambda: conventions().summary()
        self.records.append(record)
        return record

    def _search(self, convert: Callable, strategy: Any, max_examples: int | None, seed: int, *, pairs: bool,
                native: bool = False) -> list[Case]:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed

        __tracebackhide__ = True
        before = len(self.records)
        name = converter_code(convert)[0]

        def run(example: tuple[LayerSpec, LayerSpec, str, int]) -> None:
            __tracebackhide__ = True
            src, dst, dtype, data_seed = example

            def generic(k: Any, b: Any) -> Any:
                return convert(src, dst, k, b)

            record = self._run(generic if pairs else convert, src, dst, dtype, data_seed, native=native)
            record.converter = name
            if record.failed:
                call = "lambda k, b: {}(source, target, k, b)" if pairs else None
                raise ConversionCheckFailed(failure_message(record, convert, call=call), record)

        limit = max_examples or self.options.max_examples
        phases = [p for p in Phase if p.name != "explain"]  # the failure message already explains
        search = settings(max_examples=limit, deadline=None, database=None, derandomize=False, phases=phases,
                          report_multiple_bugs=False, print_blob=False,
                          suppress_health_check=list(HealthCheck))(hypothesis_seed(seed)(given(strategy)(run)))
        try:
            search()
        except ConversionCheckFailed as exc:
            # Keep only the shrunk case, which hypothesis replays last; raise it afresh, without
            # hypothesis' frames and its "Failing test case: run(example=...)" note.
            self.records[before:] = self.records[-1:]
            raise ConversionCheckFailed(str(exc), exc.record) from None
        return self._done([r.case for r in self.records[before:]])

    def _check_sequence(self, convert: Callable, source: Any, target: Any, dtypes: Sequence[str] | str | None,
                        seed: int | None, native: bool) -> list[Case]:
        """``convert(weights) -> weights`` between recurrent or attention layers, once per dtype (fixed sizes)."""
        __tracebackhide__ = True
        from equivcheck.sequence.verify import SequenceResult, failure_message, resolve_backend, verify_sequence_pair

        if native:
            raise SpecError("native=True does not apply to recurrent or attention layers yet: the converter gets numpy arrays")
        plan(source, target)  # a pair no conversion makes equivalent is an error, not a failure
        name, run_seed, cases = converter_code(convert)[0], self._seed(seed), []
        for dtype in self._dtypes(dtypes):
            (sb, snote), (tb, tnote) = (resolve_backend(s, dtype, self.options.backends) for s in (source, target))
            data_seed = derive_seed(run_seed, dtype)
            try:
                case = verify_sequence_pair(source, target, source_backend=sb, target_backend=tb, dtype=dtype,
                                            converter=_Guarded(convert), seed=data_seed)
            except _Raised as exc:
                case = SequenceResult(source, target, sb, tb, dtype, "error", seed=data_seed,
                                      reason=f"the converter raised {framework_message(exc.__cause__ or exc)}")
            notes = [n for n in (snote, tnote) if n]
            record = CheckRecord(case, test=self.test, converter=name, notes=notes)
            mistake = (case.diagnosis or {}).get("description", "")
            record.identify = lambda mistake=mistake: mistake
            self.records.append(record)
            cases.append(case)
            if record.failed:
                raise ConversionCheckFailed(failure_message(case, name), record)
        return self._done(cases)

    def _done(self, cases: list[Case]) -> list[Case]:
        if cases and all(c.verdict == "skip" for c in cases):
            raise CheckSkipped(f"nothing was checked: {cases[0].reason}")
        return cases

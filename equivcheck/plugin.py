"""pytest plugin (thin): options, the ``equivcheck`` fixture, a marker and a terminal summary.

    def test_fc6(equivcheck):
        equivcheck.check_converter(my_convert, source="keras:dense", target="torch:conv",
                                   channels=8, spatial=(5, 6), units=3)

    @pytest.mark.equivcheck(kinds=["dense->conv"], presets=["keras", "torch"], max_examples=10)
    def test_generic(equivcheck):
        equivcheck.check_pairs(my_generic_convert)   # (source, target, kernel, bias) -> (kernel, bias)

All logic lives in :mod:`equivcheck.checker`, imported on first use; loading this module
imports pytest and the ``equivcheck`` package (numpy, no deep-learning framework, no hypothesis). Each test's rows and report records travel in its own
test report (``user_properties``), so under pytest-xdist they reach the controller as each test
finishes — a worker that crashes later loses nothing already done — and the controller prints
one summary and writes one report, whatever happened.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

_PROPERTY = "equivcheck"  # the user_properties key of a test's rows and records
_MODELS = "equivcheck-modelchecks"  # the user_properties key of a test's whole-model checks (ModelCheck.to_dict())

_OPTIONS = (  # (name, ini name, help)
    ("backends", "equivcheck_backends", "comma-separated backends the checks may run layers on (default: every installed one)"),
    ("max_examples", "equivcheck_max_examples", "examples per hypothesis search over shapes or spec pairs (default: 20)"),
    ("seed", "equivcheck_seed", "seed of every check (default: random, shown in the header)"),
    ("report", "equivcheck_report", "write equivcheck.json, .md and .html for the checks into this folder "
               "(--equivcheck-report alone: reports/)"),
)
_MARKER = ("equivcheck(**options): options for this test's equivcheck fixture — backends, dtypes, max_examples, "
           "seed, and spec_pairs() arguments (kinds, presets, min_*/max_*) for check_pairs")


class _State:
    """Per-session settings and the rows/records collected from every check."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.rows: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []  # report records (with --equivcheck-report)
        self.modelchecks: list[dict[str, Any]] = []  # whole-model checks run by the tests (with --equivcheck-report)
        self.report_paths: list[str] = []
        self.report_problem = ""


_STATE = pytest.StashKey[_State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("equivcheck", "dense <-> conv weight conversion checks")
    for name, ini, text in _OPTIONS:
        flag = "--equivcheck-" + name.replace("_", "-")
        kind = int if name in ("max_examples", "seed") else str
        extra: dict[str, Any] = {"nargs": "?", "const": "reports"} if name == "report" else {}
        group.addoption(flag, dest=ini, type=kind, default=None, metavar=name.upper(), help=text, **extra)
        parser.addini(ini, text, default=None)


def _check_report_folder(folder: str, args: tuple[str, ...]) -> None:
    """Refuse a report destination that cannot be written, before any test runs.

    The folder is given only as ``--equivcheck-report=DIR``: ``--equivcheck-report tests`` would
    take the test path for the folder, so it is refused.
    """
    for flag, following in itertools.pairwise(args):
        if flag == "--equivcheck-report" and not following.startswith("-"):
            raise pytest.UsageError(f"--equivcheck-report {following}: give the folder as --equivcheck-report={following} "
                                    "(a bare --equivcheck-report writes into reports/)")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise pytest.UsageError(f"--equivcheck-report={folder}: is a file, expected a folder to write the report into")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise pytest.UsageError(f"--equivcheck-report={folder}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"--equivcheck-report={folder}: {parent} is not writable")


def _value(config: pytest.Config, ini: str, kind: type) -> Any:
    value = config.getoption(ini)
    if value is None:
        value = config.getini(ini) or None
    if value is None or kind is str:
        return value
    try:
        return kind(value)
    except ValueError:
        raise pytest.UsageError(f"{ini}={value!r} is not an integer") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER)
    values = {"backends": _value(config, "equivcheck_backends", str),
              "max_examples": _value(config, "equivcheck_max_examples", int),
              "seed": _value(config, "equivcheck_seed", int),
              "report": _value(config, "equivcheck_report", str)}
    workerinput = getattr(config, "workerinput", None)
    if values["seed"] is None:
        values["seed"] = workerinput["equivcheck_seed"] if workerinput and "equivcheck_seed" in workerinput \
            else random.randrange(2**31)
    if values["backends"]:
        values["backends"] = tuple(b.strip() for b in values["backends"].split(",") if b.strip())
        from equivcheck.backends import BACKENDS

        unknown = [b for b in values["backends"] if b not in BACKENDS]
        if unknown:
            raise pytest.UsageError(f"--equivcheck-backends has {unknown[0]!r}: expected names from {', '.join(BACKENDS)}")
    if values["max_examples"] is not None and values["max_examples"] < 1:
        raise pytest.UsageError(f"--equivcheck-max-examples={values['max_examples']}: expected a positive integer")
    if values["seed"] < 0:
        raise pytest.UsageError(f"--equivcheck-seed={values['seed']}: expected a non-negative integer")
    if values["report"] is not None and not values["report"].strip():
        raise pytest.UsageError(f"--equivcheck-report={values['report']}: expected a folder, e.g. --equivcheck-report=reports")
    if values["report"] and workerinput is None:
        _check_report_folder(values["report"], tuple(map(str, config.invocation_params.args)))
    config.stash[_STATE] = state = _State(values)
    if workerinput is None:
        config.pluginmanager.register(_Collector(state), "equivcheck-collector")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker uses the controller's seed."""
    node.workerinput["equivcheck_seed"] = node.config.stash[_STATE].values["seed"]


def pytest_report_header(config: pytest.Config) -> str:
    from equivcheck.checker import installed_backends

    v = config.stash[_STATE].values
    allowed = ",".join(v["backends"]) if v["backends"] else ",".join(installed_backends())
    line = f"equivcheck: seed={v['seed']}, backends={allowed}, max_examples={v['max_examples'] or 20}"
    return line + (f", report={v['report']}" if v["report"] else "")


def _options(config: pytest.Config, marker: pytest.Mark | None) -> tuple[Any, dict[str, Any]]:
    from equivcheck.checker import options_from

    v = config.stash[_STATE].values
    if marker is not None and marker.args:
        raise pytest.UsageError(f"@pytest.mark.equivcheck takes keyword options only, got {marker.args!r}")
    return options_from(v["backends"], v["max_examples"], v["seed"], dict(marker.kwargs) if marker else {})


@pytest.fixture
def equivcheck(request: pytest.FixtureRequest) -> Any:
    """A :class:`equivcheck.checker.Checker` for this test (seeded by the session seed and the test id).

    Where nothing can be checked (every case skipped) the test is skipped with the reason.
    """
    options, pair_defaults = _options(request.config, request.node.get_closest_marker("equivcheck"))
    checker = _pytest_checker()(options, test=request.node.nodeid, pair_defaults=pair_defaults)
    yield checker
    state = request.config.stash[_STATE]
    rows = [r.summary() | {"index": i} for i, r in enumerate(checker.records)]
    records = []
    if state.values["report"]:
        from equivcheck.report.records import check_record

        records = [check_record(r) for r in checker.records]
    if rows or records:  # with the test's report: to the controller as soon as the test is done
        request.node.user_properties.append((_PROPERTY, json.dumps({"rows": rows, "records": records}, default=str)))


def _pytest_checker() -> type:
    """:class:`~equivcheck.checker.Checker` turning :class:`~equivcheck.errors.CheckSkipped` into ``pytest.skip``."""
    from equivcheck.checker import Checker
    from equivcheck.errors import CheckSkipped

    class PytestChecker(Checker):
        def check_converter(self, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            try:
                return super().check_converter(*args, **kwargs)
            except CheckSkipped as exc:
                pytest.skip(str(exc))

        def check_pairs(self, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            try:
                return super().check_pairs(*args, **kwargs)
            except CheckSkipped as exc:
                pytest.skip(str(exc))

    return PytestChecker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """With a report: every model check the test runs (check_models, check_model_converter) becomes a report case."""
    state = item.config.stash.get(_STATE, None)
    if state is None or not state.values["report"]:
        yield
        return
    from equivcheck.modelcheck.listen import listening

    with listening() as found:
        yield
    if found:
        checks = [{**r.to_dict(), "test": item.nodeid} for r in found]
        item.user_properties.append((_MODELS, json.dumps(checks, default=str)))


class _Collector:
    """Takes each finished test's rows and records from its test report (the controller's, under xdist)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for key, value in report.user_properties:
            if key == _PROPERTY:
                sent = json.loads(value)
                self.state.rows += sent["rows"]
                self.state.records += sent["records"]
            elif key == _MODELS:
                self.state.modelchecks += json.loads(value)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash[_STATE]
    report = state.values["report"]
    if hasattr(config, "workeroutput") or not report:
        return
    from equivcheck.report import write_report

    rows = sorted(state.rows, key=lambda r: (r["test"], r["index"]))
    extra: dict[str, Any] = {"pytest checks": rows}
    if state.modelchecks:
        extra["modelchecks"] = state.modelchecks
    try:
        paths = write_report(report, state.records, seed=state.values["seed"],
                             command="pytest " + " ".join(config.invocation_params.args),
                             extra=extra, failed=bool(session.testsfailed) or exitstatus not in (0, 5))
    except Exception as exc:  # the tests ran: say why there is no report instead of failing the session
        state.report_problem = f"{type(exc).__name__}: {exc}"
        return
    state.report_paths = [str(p) for p in paths]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workeroutput"):
        return
    state = config.stash[_STATE]
    if not state.rows and not state.report_problem and not state.report_paths:
        return
    terminalreporter.section("equivcheck")
    if state.rows:
        from equivcheck.checker import summary_table

        for line in summary_table(sorted(state.rows, key=lambda r: (r["test"], r["index"]))):
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"seed {state.values['seed']} (rerun with --equivcheck-seed {state.values['seed']})")
    if state.report_paths:
        terminalreporter.write_line(f"report: {', '.join(state.report_paths)}")
    if state.report_problem:
        terminalreporter.write_line(f"equivcheck: report not written: {state.report_problem}", yellow=True)

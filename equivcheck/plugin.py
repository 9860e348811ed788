"""pytest plugin (thin): options, the ``equivcheck`` fixture, a marker and a terminal summary.

    def test_fc6(equivcheck):
        equivcheck.check_converter(my_convert, source="keras:dense", target="torch:conv",
                                   channels=8, spatial=(5, 6), units=3)

    @pytest.mark.equivcheck(kinds=["dense->conv"], presets=["keras", "torch"], max_examples=10)
    def test_generic(equivcheck):
        equivcheck.check_pairs(my_generic_convert)   # (source, target, kernel, bias) -> (kernel, bias)

All logic lives in :mod:`equivcheck.checker`; loading this module imports no deep-learning
framework (nor numpy or hypothesis). Under pytest-xdist each worker sends its results to the
controller (``workeroutput``), which prints one summary and writes one report.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

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
        self.records: list[Any] = []  # CheckRecord objects here, report records from workers
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
    config.stash[_STATE] = _State(values)


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
    """A :class:`equivcheck.checker.Checker` for this test (seeded by the session seed and the test id)."""
    from equivcheck.checker import PytestChecker

    options, pair_defaults = _options(request.config, request.node.get_closest_marker("equivcheck"))
    checker = PytestChecker(options, test=request.node.nodeid, pair_defaults=pair_defaults, skip=pytest.skip)
    yield checker
    state = request.config.stash[_STATE]
    state.rows += [r.summary() | {"index": i} for i, r in enumerate(checker.records)]
    state.records += checker.records


def _report_records(state: _State) -> list[dict[str, Any]]:
    return [r if isinstance(r, dict) else r.report_record() for r in state.records]


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash[_STATE]
    report = state.values["report"]
    if hasattr(config, "workeroutput"):  # an xdist worker: hand everything to the controller
        try:
            records = _report_records(state) if report else []
        except ImportError as exc:
            records, state.report_problem = [], str(exc)
        config.workeroutput["equivcheck"] = json.dumps({"rows": state.rows, "records": records,
                                                        "problem": state.report_problem})
        return
    if report and (state.records or state.rows):
        try:
            from equivcheck.report import write_report
        except ImportError as exc:
            state.report_problem = f"--equivcheck-report needs equivcheck.report, which is not available ({exc})"
            return
        rows = sorted(state.rows, key=lambda r: (r["test"], r["index"]))
        paths = write_report(report, _report_records(state), seed=state.values["seed"],
                             command="pytest " + " ".join(config.invocation_params.args),
                             extra={"pytest checks": rows})
        state.report_paths = [str(p) for p in paths]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect one worker's rows and report records."""
    data = getattr(node, "workeroutput", {}).get("equivcheck")
    if not data:
        return
    sent = json.loads(data)
    state = node.config.stash[_STATE]
    state.rows += sent["rows"]
    state.records += sent["records"]
    state.report_problem = state.report_problem or sent.get("problem", "")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workeroutput"):
        return
    state = config.stash[_STATE]
    if not state.rows and not state.report_problem:
        return
    from equivcheck.checker import summary_table

    terminalreporter.section("equivcheck")
    for line in summary_table(sorted(state.rows, key=lambda r: (r["test"], r["index"]))):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"seed {state.values['seed']} (rerun with --equivcheck-seed {state.values['seed']})")
    if state.report_paths:
        terminalreporter.write_line(f"report: {', '.join(state.report_paths)}")
    if state.report_problem:
        terminalreporter.write_line(f"equivcheck: report not written: {state.report_problem}", yellow=True)

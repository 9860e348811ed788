"""One real report (numpy, two deliberately wrong converters) shared by the report tests."""

import json
from pathlib import Path

import pytest

from equivcheck.report import write_report
from equivcheck.report.example import example_cases


@pytest.fixture(scope="session")
def cases():
    return example_cases(("numpy",), seed=0)


@pytest.fixture(scope="session")
def report_dir(cases, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    write_report(folder, cases, seed=0, command="pytest", extra={"explorations": [{"source": "a:dense", "found": "w.T"}]})
    return folder


@pytest.fixture(scope="session")
def doc(report_dir) -> dict:
    return json.loads((report_dir / "equivcheck.json").read_text(encoding="utf-8"))

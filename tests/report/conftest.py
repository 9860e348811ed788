"""One real report (numpy, two deliberately wrong converters) shared by the report tests."""

import json
import shutil
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


FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A real headless Chromium (selenium), its console log kept."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver to run the browser check")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install 'equivcheck[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()

"""The HTML report in a real headless Chromium: the matrix and every picture render, the console stays clean."""

import json
from pathlib import Path

from equivcheck.files import atomic_path

SCREENSHOT = Path(__file__).resolve().parents[2] / "reports" / "screenshot.png"
IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"


def _severe(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_page_renders_matrix_and_pictures(browser, report_dir):
    from selenium.webdriver.common.by import By

    doc = json.loads((report_dir / "equivcheck.json").read_text(encoding="utf-8"))
    browser.get((report_dir / "equivcheck.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#conventions tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == [r["conversion"] for r in doc["conventions"]["rows"]]
    holds = browser.find_element(By.CSS_SELECTOR, "#conventions td.holds")
    fails = browser.find_element(By.CSS_SELECTOR, "#conventions td.fails")
    assert holds.is_displayed() and fails.is_displayed()
    assert holds.value_of_css_property("background-color") != fails.value_of_css_property("background-color")
    images = browser.execute_script(IMAGES)
    assert len(images) == len(doc["pictures"])
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    assert _severe(browser) == []
    height = min(int(browser.execute_script("return document.documentElement.scrollHeight")), 6000)
    browser.set_window_size(1280, height)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with atomic_path(SCREENSHOT, force=True) as tmp:
        tmp.write_bytes(browser.get_screenshot_as_png())
        tmp.chmod(0o644)
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_checks_catch_a_broken_picture_and_an_external_resource(browser, tmp_path):
    """The same checks fail on a page whose image is corrupt and which loads something from outside."""
    page = tmp_path / "broken.html"
    html = ('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            'img-src data:"><link rel="icon" href="data:,"></head><body><img src="data:image/png;base64,AAAA">'
            '<img src="https://example.invalid/x.png"></body></html>')
    page.write_text(html, encoding="utf-8")
    browser.get_log("browser")  # drain
    browser.get(page.as_uri())
    widths = [width for _, width, _ in browser.execute_script(IMAGES)]
    assert widths == [0, 0]
    assert _severe(browser), "a blocked external image must show up as a SEVERE console entry"

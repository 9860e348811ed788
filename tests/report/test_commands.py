"""Every command's report reads on its own: title, names, shapes and verdict, in Markdown and in a real browser.

Each report comes from a small real run of the command (the CLI's ``main`` in this process, the
pytest plugin in a subprocess); the HTML is opened in headless Chromium (skipped, saying why, where
Chromium is missing), its visible text checked, its images loaded, its console clean.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from equivcheck.report import rebuild

pytest_plugins = ["pytester"]

IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"


def _cli(*args: str) -> SimpleNamespace:
    """A command run in this process (a subprocess would import TensorFlow and torch afresh, about 5 s on 2 cores;
    the entry point itself is tests/test_cli.py's): its exit status and what it wrote to stderr."""
    from equivcheck.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def _read(folder: Path) -> tuple[dict, str, str]:
    return (json.loads((folder / "equivcheck.json").read_text(encoding="utf-8")),
            (folder / "equivcheck.md").read_text(encoding="utf-8"), (folder / "equivcheck.html").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def verify_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify")
    done = _cli("verify", "--from", "keras:dense", "--to", "torch:conv", "--channels", "2", "--spatial", "3,4",
                "--units", "2", "--backends", "numpy", "--report", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def explore_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explore")
    done = _cli("explore", "--from", "keras:dense", "--to", "torch:conv", "--channels", "3", "--spatial", "4,5",
                "--units", "2", "--backend", "numpy", "--report", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def verify_model_report(tmp_path_factory, keras) -> Path:
    from equivcheck import files
    from equivcheck.fcn.commands import convolutionalize_file

    from ..fcn.test_keras_models import randomize, small_functional

    folder = tmp_path_factory.mktemp("verify-model")
    src, conv = folder / "small.keras", folder / "small_conv.keras"
    files.save_keras_model(randomize(small_functional(keras)), src)
    convolutionalize_file(src, conv)
    done = _cli("verify-model", str(src), str(conv), "--report", str(folder / "report"))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "report"


@pytest.fixture(scope="module")
def check_models_report(tmp_path_factory, torch, keras) -> Path:
    from equivcheck import files
    from equivcheck.modelcheck.examples import to_keras, torch_vgg

    folder = tmp_path_factory.mktemp("check-models")
    model = torch_vgg()
    np.savez(folder / "vgg.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    files.save_keras_model(to_keras(model, flatten="wrong"), folder / "vgg_wrong.keras")
    done = _cli("check-models", str(folder / "vgg.npz"), str(folder / "vgg_wrong.keras"), "--input-shape", "2,3,12,10",
                "--model", "equivcheck.modelcheck.examples:torch_vgg", "--report", str(folder / "report"))
    assert done.returncode == 1, done.stderr[-2000:]  # the flatten order is wrong
    return folder / "report"


PLUGIN_TESTS = """
import functools
import equivcheck as ec

SHAPE = dict(channels=2, spatial=(3, 4), units=2)

def planned(kernel, bias):
    return ec.convert(ec.spec('keras:dense', **SHAPE), ec.spec('torch:conv', **SHAPE), kernel, bias)

def as_chw(kernel, bias, units):
    return kernel.T.reshape(units, 2, 3, 4), bias

def test_planned(equivcheck):
    equivcheck.check_converter(planned, source='keras:dense', target='torch:conv', **SHAPE)

def test_as_chw(equivcheck):
    equivcheck.check_converter(functools.partial(as_chw, units=2), source='keras:dense', target='torch:conv', **SHAPE)
"""


@pytest.fixture(scope="module")
def plugin_report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "test_converters.py").write_text(PLUGIN_TESTS, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--equivcheck-backends=numpy", "--equivcheck-max-examples=2",
                           "--equivcheck-report=out", "test_converters.py"], capture_output=True, text=True,
                          cwd=folder, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:]  # test_as_chw fails
    return folder / "out"


# -- what each report must say ----------------------------------------------------------------
EXPECTED = {
    # command: (title, words that must be in the text, overall verdict)
    "verify": ("equivcheck verify: keras:dense → torch:conv",
               ["keras:dense (input 3×4×2 → 2, kernel 24×2)", "torch:conv (input 2×3×4 → 2×1×1, kernel 2×2×3×4)",
                "numpy → numpy", "float32"], "pass"),
    "explore": ("equivcheck explore: keras:dense (numpy) → torch:conv (numpy)",
                ["kernel 60×2", "kernel 2×3×4×5", "w.reshape(4, 5, 3, 2).transpose(3, 2, 0, 1)",
                 "rearrange(w, '(h w i) o -> o i h w', i=3, h=4, w=5)", "flatten order", "HWC", "mapping found"], "pass"),
    "verify-model": ("equivcheck verify-model: keras small → convolutionalized",
                     ["input 14×12×3", "16×14×3", "sliding window", "training size", "(0, 0) (0, 1) (1, 0) (1, 1)",
                      "fc1", "w.reshape(4, 3, 5, 6)"], "pass"),
    "check-models": ("equivcheck check-models: torch SmallVGG → keras small_vgg_keras",
                     ["input 2×3×12×10", "classifier.0", "fc1", "wrong flatten order (CHW read as HWC)",
                      "First wrong layer", "w.reshape(8, 6, 3, 2).transpose(2, 3, 1, 0).reshape(36, 8)"], "fail"),
    "pytest": ("equivcheck pytest: keras:dense → torch:conv",
               ["test_converters.py::test_as_chw", "test_converters.py::test_planned", "planned", "as_chw",
                "keras:dense (input 3×4×2 → 2, kernel 24×2)", "wrong flatten order"], "fail"),
}
REPORTS = {"verify": "verify_report", "explore": "explore_report", "verify-model": "verify_model_report",
           "check-models": "check_models_report", "pytest": "plugin_report"}


@pytest.fixture(params=list(REPORTS))
def report(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(REPORTS[request.param])


def _plain(markdown: str) -> str:
    return markdown.replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&").replace("\\|", "|")


def test_markdown_says_what_was_checked_and_the_verdict(report):
    command, folder = report
    title, words, verdict = EXPECTED[command]
    doc, md, _ = _read(folder)
    assert doc["summary"]["verdict"] == verdict
    assert doc["summary"]["ok"] is (verdict == "pass")
    first = md.splitlines()[0]
    assert first.startswith(f"# {title}" if command != "explore" else "# equivcheck explore: keras:dense"), first
    mark = {"pass": "✅ pass", "fail": "❌ fail"}[verdict]
    assert f"**Verdict: {mark}**" in md.splitlines()[2]
    text = _plain(md)
    missing = [w for w in words if w not in text]
    assert not missing, missing
    assert "0 cases" not in md and "none" not in md.splitlines()[2]
    assert "| index |" not in md and "[]" not in md  # no constant index column, no empty lists


def test_rebuild_from_the_json_alone_is_byte_identical(report, tmp_path):
    _, folder = report
    rebuild(folder / "equivcheck.json", tmp_path)
    for name in ("equivcheck.md", "equivcheck.html"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_the_page_in_a_browser_shows_names_shapes_and_verdict(report, browser):
    from selenium.webdriver.common.by import By

    command, folder = report
    title, words, verdict = EXPECTED[command]
    doc, _, _ = _read(folder)
    browser.get_log("browser")  # drain
    browser.get((folder / "equivcheck.html").as_uri())
    heading = browser.find_element(By.TAG_NAME, "h1").text
    assert heading.startswith(title if command != "explore" else "equivcheck explore: keras:dense"), heading
    badge = browser.find_element(By.CSS_SELECTOR, "#verdict .badge")
    assert badge.text == verdict and badge.is_displayed()
    text = browser.find_element(By.TAG_NAME, "body").text
    missing = [w for w in words if w not in text]
    assert not missing, missing
    images = browser.execute_script(IMAGES)
    assert len(images) == len(doc.get("pictures") or {})
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    wide = browser.execute_script("return document.documentElement.scrollWidth > window.innerWidth")
    assert not wide, "the page runs off to the right"


# -- the first wrong layer's picture ----------------------------------------------------------
@pytest.fixture(scope="module")
def wrong_vgg(torch, keras):
    """A real torch → Keras conversion with the classifier's flatten order wrong, and its check."""
    from equivcheck.modelcheck import check_models
    from equivcheck.modelcheck.examples import SHAPE, to_keras, torch_vgg

    model = torch_vgg()
    converted = to_keras(model, flatten="wrong")
    return model, converted, check_models(model, converted, input_shape=SHAPE).to_dict()


def _fc1_specs():
    import equivcheck as ec

    return (ec.spec("torch:dense", channels=6, spatial=(3, 2), units=8),
            ec.spec("keras:dense", channels=6, spatial=(3, 2), units=8))


def test_kernel_readout_finds_where_each_converted_weight_came_from(wrong_vgg):
    from equivcheck.report.readout import kernel_readout

    model, converted, _ = wrong_vgg
    source, target = _fc1_specs()
    kernel = model.classifier[0].weight.detach().numpy()
    wrong = kernel_readout(source, target, kernel, converted.get_layer("fc1").get_weights()[0])
    # the kernel read HWC as CHW: output 0's input channel 0 holds one channel of every map position
    # where the right kernel holds every map position of channel 0
    assert wrong == {"position": [[0, 0], [0, 0], [0, 0]], "channel": [[0, 1], [2, 3], [4, 5]], "step": 1}
    right = kernel_readout(source, target, kernel, kernel.T.reshape(6, 3, 2, 8).transpose(1, 2, 0, 3).reshape(36, 8))
    assert right == {"position": [[0, 1], [2, 3], [4, 5]], "channel": [[0, 0], [0, 0], [0, 0]], "step": 1}
    assert kernel_readout(source, target, kernel, np.zeros((3, 3))) is None  # not the spec's shape


@pytest.mark.parametrize("with_readout", [True, False], ids=["readout", "specs-only"])
def test_the_first_wrong_layer_is_pictured_and_the_picture_loads(wrong_vgg, with_readout, tmp_path, browser):
    """What modelcheck's layer rows can carry (specs, the read-out of the real kernels) becomes the layer's picture."""
    from equivcheck.report import validate, write_report
    from equivcheck.report.readout import kernel_readout
    from equivcheck.serialize import spec_to_dict

    model, converted, check = wrong_vgg
    check = json.loads(json.dumps(check))
    source, target = _fc1_specs()
    row = next(r for r in check["layers"] if r["source"] == "classifier.0")
    row.update(source_spec=spec_to_dict(source), converted_spec=spec_to_dict(target))
    if with_readout:
        row["readout"] = kernel_readout(source, target, model.classifier[0].weight.detach().numpy(),
                                        converted.get_layer("fc1").get_weights()[0])
    write_report(tmp_path, [], command="check-models", extra={"modelchecks": [check]})
    doc, _, page = _read(tmp_path)
    validate(doc)
    (pid,) = doc["extra"]["modelchecks"][0]["pictures"]
    assert pid.startswith("layer-") and f'id="pic-{pid}"' in page
    picture = doc["pictures"][pid]
    assert "classifier.0 ↔ fc1" in picture["title"]
    if with_readout:
        assert "83.3% of positions holding a weight from the wrong place" in picture["caption"]
    browser.get_log("browser")
    browser.get((tmp_path / "equivcheck.html").as_uri())
    images = browser.execute_script(IMAGES)
    assert len(images) == 1 and images[0][0] and images[0][1] > 200 and images[0][2] > 200, images
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    marked = browser.find_element("css selector", "tr.first-divergence")
    assert marked.text.startswith("→ classifier.0") and "fc1" in marked.text

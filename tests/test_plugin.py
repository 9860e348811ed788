"""The pytest plugin, driven through pytester: options, fixture, marker, summary, report, xdist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")

CONVERTERS = '''
import sys
import pytest

def good(k, b):  # onnx:dense (3, 8·5·6) -> caffe:conv (3, 8, 5, 6)
    return k.reshape(3, 8, 5, 6), b

def flipped(k, b):  # the theano/scipy kernel, where caffe wants a correlation
    return k.reshape(3, 8, 5, 6)[:, :, ::-1, ::-1].copy(), b

def generic(source, target, k, b):
    import equivcheck as ec
    return ec.plan(source, target).apply(k), b
'''

NUMPY_TESTS = CONVERTERS + '''
def test_good(equivcheck):
    equivcheck.check_converter(good, source="onnx:dense", target="caffe:conv", channels=8, spatial=(5, 6), units=3)
    assert not [m for m in {FRAMEWORKS!r} if m in sys.modules], "a numpy-only check imported a framework"

def test_flipped(equivcheck):
    equivcheck.check_converter(flipped, source="onnx:dense", target="caffe:conv", channels=8, spatial=(5, 6), units=3)

@pytest.mark.equivcheck(kinds=["dense->conv", "conv->conv"], presets=["onnx", "caffe", "tflite"], max_examples=6)
def test_pairs(equivcheck):
    cases = equivcheck.check_pairs(generic)
    assert len(cases) == 6
'''.replace("{FRAMEWORKS!r}", repr(FRAMEWORKS))


def _subprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def _section(out: str) -> list[str]:
    """The lines of the terminal summary's equivcheck section."""
    return out.split(" equivcheck ===")[1].split("\n", 1)[1].split("=====")[0].splitlines()


def test_loading_the_plugin_imports_no_framework():
    code = ("import sys, equivcheck.plugin; "
            f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; "
            "assert not bad, bad; assert 'hypothesis' not in sys.modules and 'equivcheck.checker' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_lists_the_options_and_ini_names(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    for option in ("--equivcheck-backends", "--equivcheck-max-examples", "--equivcheck-seed", "--equivcheck-report"):
        assert option in text
    for ini in ("equivcheck_backends", "equivcheck_max_examples", "equivcheck_seed", "equivcheck_report"):
        assert ini in text
    markers = pytester.runpytest("--markers").stdout.str()
    assert "@pytest.mark.equivcheck(**options)" in markers


def test_outcomes_summary_report_and_the_same_under_xdist(pytester: pytest.Pytester):
    pytester.makepyfile(test_conversions=NUMPY_TESTS)
    pytester.makeini("[pytest]\nequivcheck_seed = 11\nequivcheck_max_examples = 4\n")
    result = _subprocess(pytester, "--equivcheck-backends", "numpy,torch")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "equivcheck: seed=11, backends=numpy,torch, max_examples=4" in out  # header: ini file and option
    assert "flipped does not convert onnx:dense → caffe:conv correctly (fail)" in out
    assert "matches caffe:conv except: spurious flip; it is the right kernel for theano:conv, scipy:conv" in out
    assert "source = ec.spec('onnx:dense', channels=8, spatial=(5, 6), units=3)" in out
    assert "from test_conversions import flipped" in out
    summary = _section(out)
    assert any("onnx:dense → caffe:conv" in row and "flipped" in row and "1 fail" in row for row in summary)
    assert any("matches caffe:conv (= torch:conv, jax:conv, onnx:conv, tf2onnx:conv)" in row and "1 pass" in row for row in summary)
    assert "seed 11 (rerun with --equivcheck-seed 11)" in summary

    pytest.importorskip("xdist", reason="pytest-xdist runs the workers")
    parallel = _subprocess(pytester, "-n", "2", "--equivcheck-report=out", "--equivcheck-backends", "numpy,torch")
    parallel.assert_outcomes(passed=2, failed=1)
    rows = _section(parallel.stdout.str())
    assert rows[:-1] == summary and rows[-1] == "report: out/equivcheck.json, out/equivcheck.md, out/equivcheck.html"
    doc = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    assert doc["run"]["seed"] == 11
    verdicts = sorted((c["test"].split("::")[1], c["verdict"]) for c in doc["cases"])
    assert verdicts == [("test_flipped", "fail"), ("test_good", "pass")] + [("test_pairs", "pass")] * 6
    assert (pytester.path / "out" / "equivcheck.html").is_file()
    assert not list((pytester.path / "out").glob(".equivcheck-parts/*"))


def test_disabling_the_plugin(pytester: pytest.Pytester):
    pytester.makepyfile("def test_uses_fixture(equivcheck):\n    pass\n")
    result = _subprocess(pytester, "-p", "no:equivcheck")
    result.assert_outcomes(errors=1)
    assert "fixture 'equivcheck' not found" in result.stdout.str()
    assert "equivcheck: seed=" not in result.stdout.str()
    bad = _subprocess(pytester, "-p", "no:equivcheck", "--equivcheck-seed", "3")
    assert bad.ret != 0 and "unrecognized arguments: --equivcheck-seed" in bad.stderr.str()


def test_bad_options_are_usage_errors(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--equivcheck-backends", "numpy,caffe2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--equivcheck-backends has 'caffe2'" in result.stderr.str()


def test_real_torch_through_the_fixture(pytester: pytest.Pytester):
    pytest.importorskip("torch", reason="checks the fixture on real torch layers")
    from equivcheck.checker import installed_backends

    assert "torch" in installed_backends(), "torch imports here, but equivcheck does not offer its backend"
    pytester.makepyfile('''
import pytest

def right(k, b):
    return k.reshape(4, 2, 3, 3), b

def test_torch(equivcheck):
    cases = equivcheck.check_converter(right, "torch:dense", "torch:conv", channels=2, spatial=(3, 3), units=4,
                                       dtypes=["float32", "bfloat16"])
    assert [(c.source_backend, c.target_backend, c.verdict) for c in cases] == [("torch", "torch", "pass")] * 2

@pytest.mark.equivcheck(backends=["numpy"])
def test_restricted(equivcheck):
    equivcheck.check_converter(right, "torch:dense", "torch:conv", channels=2, spatial=(3, 3), units=4)
    record = equivcheck.records[0]
    assert (record.case.source_backend, record.case.target_backend) == ("numpy", "numpy")
    assert "backend 'torch' is not among the allowed backends (numpy)" in record.notes[0]
''')
    result = _subprocess(pytester, "--equivcheck-seed", "1")
    result.assert_outcomes(passed=2)
    summary = result.stdout.str().split("equivcheck ==")[1]
    assert "torch → torch  bfloat16" in summary and "numpy → numpy  float32" in summary


def test_report_flag_alone_writes_into_reports(pytester: pytest.Pytester):
    pytester.makepyfile(
        "import equivcheck as ec\n\n"
        "def test_it(equivcheck):\n"
        "    src = ec.spec('onnx:dense', channels=2, spatial=(3,), units=2)\n"
        "    dst = ec.spec('caffe:conv', channels=2, spatial=(3,), units=2)\n"
        "    equivcheck.check_converter(lambda k, b: ec.convert(src, dst, k, b), source='onnx:dense', target='caffe:conv',\n"
        "                               channels=2, spatial=(3,), units=2)\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report")
    assert result.ret == 0
    assert sorted(p.name for p in (pytester.path / "reports").iterdir()) == ["equivcheck.html", "equivcheck.json", "equivcheck.md"]


def test_the_report_folder_is_given_only_as_an_equals_value_and_must_be_writable(pytester: pytest.Pytester):
    pytester.makepyfile("def test_it():\n    pass\n")
    spaced = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report", "tests")
    assert spaced.ret == pytest.ExitCode.USAGE_ERROR
    assert "give the folder as --equivcheck-report=tests" in spaced.stderr.str()
    (pytester.path / "afile").write_text("x")
    on_a_file = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report=afile")
    assert on_a_file.ret == pytest.ExitCode.USAGE_ERROR and "is a file" in on_a_file.stderr.str()
    assert (pytester.path / "afile").read_text() == "x"


def test_a_failed_session_is_never_an_ok_report(pytester: pytest.Pytester):
    pytester.makepyfile(
        "import equivcheck as ec\n\n"
        "def test_good(equivcheck):\n"
        "    src = ec.spec('onnx:dense', channels=2, spatial=(3,), units=2)\n"
        "    dst = ec.spec('caffe:conv', channels=2, spatial=(3,), units=2)\n"
        "    equivcheck.check_converter(lambda k, b: ec.convert(src, dst, k, b), source=src, target=dst)\n\n"
        "def test_unrelated_failure():\n"
        "    assert False\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report=out", "--equivcheck-backends=numpy")
    assert result.ret == 1
    doc = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    assert doc["summary"]["verdicts"]["pass"] == 1 and doc["summary"]["ok"] is False


def test_a_crashed_xdist_worker_loses_no_finished_check(pytester: pytest.Pytester):
    pytest.importorskip("xdist", reason="pytest-xdist runs the worker")
    pytester.makepyfile(
        "import os\nimport equivcheck as ec\n\n"
        "def test_a_check(equivcheck):\n"
        "    src = ec.spec('onnx:dense', channels=2, spatial=(3,), units=2)\n"
        "    dst = ec.spec('caffe:conv', channels=2, spatial=(3,), units=2)\n"
        "    equivcheck.check_converter(lambda k, b: (k.reshape(2, 2, 3)[:, :, ::-1], b), source=src, target=dst)\n\n"
        "def test_z_crash():\n"
        "    os._exit(3)\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "--max-worker-restart=0", "-p", "no:randomly",
                                           "--equivcheck-report=out", "--equivcheck-backends=numpy")
    assert result.ret != 0
    doc = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    assert [c["verdict"] for c in doc["cases"]] == ["fail"], "the finished check's record reached the controller"
    assert doc["summary"]["ok"] is False


LOST_CASES = '''
import functools
import numpy as np

SHAPE = dict(source="onnx:dense", target="caffe:conv", channels=8, spatial=(5, 6), units=3)

class Conv:
    @staticmethod
    def broken(k, b):
        raise KeyError("fc1.weight")

def scaled(k, b, *, factor, flip=False):
    k = k.reshape(3, 8, 5, 6) * factor
    return (k[:, :, ::-1, ::-1].copy() if flip else k), b

def test_raises(equivcheck):
    equivcheck.check_converter(Conv.broken, **SHAPE)

def test_one_array(equivcheck):
    equivcheck.check_converter(lambda k, b: k, **SHAPE)

def test_partial_good(equivcheck):
    equivcheck.check_converter(functools.partial(scaled, factor=1), **SHAPE)

def test_partial_bad(equivcheck):
    equivcheck.check_converter(functools.partial(scaled, factor=1, flip=True), **SHAPE)

def test_search(equivcheck):
    equivcheck.check_converter(lambda k, b: (k[::-1].copy(), b), source="onnx:dense", target="tflite:dense",
                               channels=(1, 6), spatial=((1, 4), (1, 4)), units=(1, 3))

def test_fails_after_its_check(equivcheck):
    equivcheck.check_converter(functools.partial(scaled, factor=1), **SHAPE)
    raise RuntimeError("something else went wrong")
'''


def _reproducers(out: str) -> dict[str, str]:
    """Each failing test's reproducer, dedented, by test name."""
    found = {}
    failures = re.split(r"\n=+ ", out.split(" FAILURES ", 1)[1], maxsplit=1)[0]  # not the sections after them
    for block in failures.split("\n____")[1:]:
        test = block.split(" ", 2)[1]
        if "reproduce:" in block:
            lines = block.split("reproduce:\n")[1].splitlines()
            code = [line[1:] for line in lines if line.startswith("E           ")]
            found[test] = textwrap.dedent("\n".join(code))
    return found


def test_the_plugin_loses_no_case_and_shows_no_machinery(pytester: pytest.Pytester):
    import ast
    import re

    pytester.makepyfile(test_lost=LOST_CASES)
    result = _subprocess(pytester, "--equivcheck-report=out", "--equivcheck-backends=numpy", "--equivcheck-seed=5")
    result.assert_outcomes(passed=1, failed=5)
    out = result.stdout.str()
    doc = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    cases = {c["test"].split("::")[1]: c for c in doc["cases"]}
    assert sorted(cases) == ["test_fails_after_its_check", "test_one_array", "test_partial_bad", "test_partial_good",
                             "test_raises", "test_search"]
    assert cases["test_raises"]["verdict"] == "error"
    assert cases["test_raises"]["reason"] == "the converter raised KeyError: 'fc1.weight'"
    assert cases["test_one_array"]["verdict"] == "error" and "expected a (kernel, bias) tuple" in cases["test_one_array"]["reason"]
    assert cases["test_search"]["verdict"] == "fail" and cases["test_fails_after_its_check"]["verdict"] == "pass"
    assert cases["test_partial_bad"]["converter"] == "scaled(factor=1, flip=True)"
    assert doc["summary"]["ok"] is False

    summary = _section(out)
    row = {re.split(r"\s{2,}", r)[1]: r for r in summary[1:] if "→" in r}
    assert "1 error" in row["Conv.broken"] and "1 fail" in row["scaled(factor=1, flip=True)"]
    assert "2 pass" in row["scaled(factor=1)"]  # grouped by the partial's function and arguments, not "partial"
    assert any("onnx:dense → tflite:dense" in r and "1 fail" in r and "<lambda> (test_lost.py:" in r for r in summary)
    assert summary[-1] == "report: out/equivcheck.json, out/equivcheck.md, out/equivcheck.html"

    assert "equivcheck/checker" not in out and "equivcheck/plugin" not in out  # no frame of equivcheck's own
    assert "Failing test case" not in out and "run(example=" not in out and "DenseSpec(" not in out
    reproducers = _reproducers(out)
    assert set(reproducers) == {"test_raises", "test_one_array", "test_partial_bad", "test_search"}
    for code in reproducers.values():
        ast.parse(code)  # valid Python, every one
    assert "functools.partial(scaled, factor=1, flip=True)" in reproducers["test_partial_bad"]
    assert "check_conversion(Conv.broken," in reproducers["test_raises"]
    rerun = subprocess.run([sys.executable, "-c", reproducers["test_partial_bad"]], cwd=pytester.path,
                           capture_output=True, text=True)
    assert rerun.returncode == 0 and rerun.stdout.startswith("fail "), rerun.stderr[-500:]


def test_the_report_is_written_whatever_happened(pytester: pytest.Pytester):
    pytester.makepyfile(test_fine="def test_fine():\n    pass\n", test_broken="import not_a_module_anywhere\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report=out")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # the collection error stops the session
    doc = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    assert doc["cases"] == [] and doc["summary"]["ok"] is False
    assert "report: out/equivcheck.json" in result.stdout.str()


@pytest.mark.parametrize(("value", "words"), [
    ("", "--equivcheck-report=: expected a folder"),
    ("afile/sub", "afile is a file, so no folder can be made under it"),
    ("afile", "is a file, expected a folder"),
])
def test_a_report_destination_that_cannot_be_written_is_refused_before_tests_run(pytester: pytest.Pytester, value, words):
    pytester.makepyfile("def test_it():\n    open('ran', 'w').close()\n")
    (pytester.path / "afile").write_text("x")
    result = pytester.runpytest("-p", "no:cacheprovider", f"--equivcheck-report={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and words in result.stderr.str()
    assert not (pytester.path / "ran").exists() and (pytester.path / "afile").read_text() == "x"


def test_an_unwritable_report_folder_is_refused(pytester: pytest.Pytester, monkeypatch):
    import os

    pytester.makepyfile("def test_it():\n    open('ran', 'w').close()\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if "locked" in str(p) else real(p, mode, **kw))
    (pytester.path / "locked").mkdir()  # as root every folder is writable, so the refusal is simulated
    result = pytester.runpytest("-p", "no:cacheprovider", "--equivcheck-report=locked/reports")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "locked is not writable" in result.stderr.str()
    assert not (pytester.path / "ran").exists() and not (pytester.path / "locked" / "reports").exists()


def test_a_partial_keeps_its_name_with_native_inputs():
    import functools

    import equivcheck as ec
    from equivcheck.checker import Checker, Options

    src, dst = (ec.spec(name, channels=2, spatial=(3,), units=2) for name in ("caffe:dense", "caffe:conv"))

    def scaled(k, b, *, factor):
        return ec.plan(src, dst).apply(k) * factor, b

    checker = Checker(Options(seed=1))
    checker.check_converter(functools.partial(scaled, factor=1), src, dst, native=True)
    assert [r.converter for r in checker.records] == ["scaled(factor=1)"]

"""Bad input, catalogued: each gives one clear line and leaves no partial or changed file.

API: an EquivcheckError subclass. CLI: exit 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import pickle
import re
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck.cli import main
from equivcheck.errors import EquivcheckError

SMALL = dict(channels=3, spatial=(4, 5), units=6)
SMALL_FLAGS = ["--channels", "3", "--spatial", "4,5", "--units", "6"]
SRC, DST = ec.spec("keras:dense", **SMALL), ec.spec("torch:conv", **SMALL)
GOOD = np.random.default_rng(0).standard_normal((60, 6)).astype(np.float32)

# -- the API ----------------------------------------------------------------------------------
API_CASES = {
    "kernel of the wrong shape": (lambda: ec.convert(SRC, DST, np.zeros((59, 6), np.float32)), "kernel shape=(59, 6)"),
    "kernel of the wrong rank": (lambda: ec.convert(SRC, DST, np.zeros((60, 6, 1), np.float32)), "expected (60, 6)"),
    "integer kernel": (lambda: ec.convert(SRC, DST, np.ones((60, 6), np.int32)), "dtype=int32 is not a floating-point"),
    "boolean kernel": (lambda: ec.convert(SRC, DST, np.ones((60, 6), bool)), "dtype=bool"),
    "NaN in the kernel": (lambda: ec.convert(SRC, DST, np.where(GOOD > 2, np.nan, GOOD)), "NaN or Inf"),
    "Inf in the bias": (lambda: ec.convert(SRC, DST, GOOD, np.full(6, np.inf, np.float32)), "bias holds NaN or Inf"),
    "bias of the wrong length": (lambda: ec.convert(SRC, DST, GOOD, np.zeros(5, np.float32)), "bias shape=(5,)"),
    "a list, not an array": (lambda: ec.convert(SRC, DST, GOOD.tolist()), "type=list is not an array"),
    "zero channels": (lambda: ec.spec("keras:dense", channels=0, spatial=(4,), units=2), "channels=0"),
    "negative units": (lambda: ec.spec("keras:dense", channels=2, spatial=(4,), units=-3), "units=-3"),
    "zero-size map": (lambda: ec.spec("keras:dense", channels=2, spatial=(0, 4), units=2), "spatial[0]=0"),
    "float sizes": (lambda: ec.spec("torch:conv", channels=2.5, spatial=(4,), units=2), "channels=2.5"),
    "rank 4 conv": (lambda: ec.spec("torch:conv", channels=2, spatial=(2, 2, 2, 2), units=2), "needs 1, 2 or 3"),
    "kernel larger than map": (lambda: ec.spec("torch:conv", channels=2, spatial=(3,), units=2, kernel_size=(5,)), "does not fit"),
    "shape too large for memory": (lambda: ec.spec("keras:dense", channels=1 << 16, spatial=(1 << 10, 1 << 10), units=4), "more than the limit"),
    "verify past the memory": (
        lambda: ec.verify_pair(*(ec.spec(n, channels=2048, spatial=(64, 64), units=512) for n in ("keras:dense", "torch:dense"))),
        "more than half of this machine",
    ),
    "impossible mapping": (lambda: ec.plan(SRC, ec.spec("torch:conv", **SMALL, kernel_size=(3, 3))), "smaller than the map"),
    "unknown preset": (lambda: ec.spec("mxnet:dense", channels=1, units=1), "preset='mxnet' is unknown"),
    "mapping applied to the wrong shape": (lambda: ec.plan(SRC, DST).apply(np.zeros((6, 60))), "got shape=(6, 60)"),
    "converter returning nonsense": (
        lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (k, b)), "converter returned a kernel of shape=(60, 6)",
    ),
    "converter returning one array": (lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: k), "expected a (kernel, bias) tuple"),
    "unknown dtype": (lambda: ec.verify_pair(SRC, DST, dtype="int8"), "dtype='int8'"),
    "unknown backend": (lambda: ec.verify_pair(SRC, DST, source_backend="mxnet"), "backend='mxnet' is unknown"),
}


@pytest.mark.parametrize("name", API_CASES)
def test_api_bad_input(name):
    build, match = API_CASES[name]
    with pytest.raises(EquivcheckError, match=re.escape(match)) as info:
        build()
    assert "\n" not in str(info.value)


def test_nan_from_a_converter_never_passes():
    case = ec.verify_pair(SRC, DST, converter=lambda k, b: (np.full(DST.kernel_shape, np.nan, np.float32), b))
    assert case.verdict == "fail" and "NaN" in case.reason


# -- the CLI and files ------------------------------------------------------------------------
@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "dense.npz"
    np.savez(path, kernel=GOOD, bias=np.zeros(6, np.float32))
    return path


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def convert_args(src, out, *extra):
    return ["convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL_FLAGS, src, out, *extra]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def write_bad(tmp_path, kind):
    path = tmp_path / f"bad-{kind}.npz"
    if kind == "truncated":
        np.savez(path, kernel=GOOD)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("kernel,bias\n1,2\n")
    elif kind == "pickle-npy":
        path = tmp_path / "bad.npy"
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "pickle-raw":
        path.write_bytes(pickle.dumps({"kernel": GOOD}))
    elif kind == "ints":
        np.savez(path, kernel=np.ones((60, 6), np.int64))
    elif kind == "nan":
        np.savez(path, kernel=np.full((60, 6), np.nan, np.float32))
    elif kind == "no-kernel":
        np.savez(path, something=GOOD)
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "truncated or corrupt|not a readable"),
        ("text", "not a readable"),
        ("pickle-npy", "pickled"),
        ("pickle-raw", "is a pickle, which could run code"),
        ("ints", "expected a floating-point array"),
        ("nan", "NaN or Inf"),
        ("no-kernel", "no kernel in"),
        ("empty", "not a readable|truncated"),
    ],
)
def test_cli_refuses_bad_files_without_writing(tmp_path, capsys, kind, match):
    bad = write_bad(tmp_path, kind)
    before = snapshot(tmp_path)
    code, err = cli(capsys, *convert_args(bad, tmp_path / "out.npz"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert any(m in err for m in match.split("|")), err
    assert snapshot(tmp_path) == before


def test_output_in_a_missing_folder(tmp_path, capsys, weights):
    code, err = cli(capsys, *convert_args(weights, tmp_path / "nope" / "out.npz"))
    assert code == 2 and "does not exist: create it first" in err


def test_output_in_an_unwritable_folder(tmp_path, capsys, weights, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    if os.geteuid() != 0:  # as root a read-only folder is still writable, so the refusal is simulated
        monkeypatch.undo()
        (tmp_path / "ro").mkdir(mode=0o500)
    out = tmp_path / ("ro" if os.geteuid() != 0 else "") / "out.npz"
    code, err = cli(capsys, *convert_args(weights, out))
    assert code == 2 and ("not writable" in err or "Permission denied" in err)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, capsys, weights):
    out = tmp_path / "out.npz"
    out.write_bytes(b"precious")
    code, err = cli(capsys, *convert_args(weights, out))
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"


def test_interrupted_write_leaves_the_old_file_whole(tmp_path, capsys, weights, monkeypatch):
    out = tmp_path / "out.npz"
    out.write_bytes(b"old version")

    def explode(fh, **arrays):
        fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", explode)
    code, err = cli(capsys, *convert_args(weights, out, "--force"))
    assert code == 130 and "interrupted" in err
    assert out.read_bytes() == b"old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.npz", "out.npz"]


def test_wrong_output_suffix(tmp_path, capsys, weights):
    code, err = cli(capsys, *convert_args(weights, tmp_path / "out.csv"))
    assert code == 2 and "expected .npz or .npy" in err and not (tmp_path / "out.csv").exists()


# -- fuzzing the CLI ----------------------------------------------------------------------------
FLAGS = ["--from", "--to", "--channels", "--spatial", "--units", "--kernel-size", "--stride", "--dilation",
         "--padding", "--groups", "--multiplier", "--no-bias", "--json", "--dtype", "--backends", "--seed"]
VALUES = ["keras:dense", "torch:conv", "theano:conv", "keras:depthwise", "tflite:conv_transpose", "x:y", ":", "3",
          "0", "-2", "7,7", "1,0", "a,b", "same", "valid", "1e9", "99999999999", "", "numpy", "float16", "int8"]
COMMANDS = ["plan", "verify", "presets", "backends", "nonsense"]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.sampled_from(COMMANDS), st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES),
                                                      st.text(string.printable, max_size=6)), max_size=12))
def test_fuzzed_arguments_never_traceback(capsys, command, argv):
    try:
        code = main([command, *argv])
    except SystemExit as exc:  # argparse --help/--version
        code = exc.code
    _, err = capsys.readouterr()
    assert code in (0, 1, 2), code
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("equivcheck: error: ") and err.count("\n") <= 1, err


# -- the plugin -------------------------------------------------------------------------------
pytest_plugins = ["pytester"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--equivcheck-max-examples", "-1"], "--equivcheck-max-examples=-1: expected a positive integer"),
        (["--equivcheck-max-examples", "many"], "invalid int value"),
        (["--equivcheck-seed", "x"], "invalid int value"),
        (["--equivcheck-backends", "numpy,caffe2"], "caffe2"),
    ],
)
def test_plugin_bad_options_are_usage_errors(pytester, args, match):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert match in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


PLUGIN_MISUSE = {
    "unknown preset": ("equivcheck.check_converter(lambda k, b: (k, b), source='mxnet:dense', target='torch:conv', "
                       "channels=2, spatial=(3,), units=2)", "preset='mxnet' is unknown"),
    "impossible pair": ("equivcheck.check_converter(lambda k, b: (k, b), source='onnx:dense', target='caffe:conv', "
                        "channels=2, spatial=(3, 3), units=2, kernel_size=(2, 2))", "smaller than the map"),
    "negative channels": ("equivcheck.check_converter(lambda k, b: (k, b), source='onnx:dense', target='caffe:conv', "
                          "channels=-2, spatial=(3,), units=2)", "channels=-2"),
    "converter returns one array": ("equivcheck.check_converter(lambda k, b: k, source='onnx:dense', target='caffe:conv', "
                                    "channels=2, spatial=(3,), units=2)", "(kernel, bias) tuple"),
    "marker with a positional argument": ("pass", "keyword options only"),
}


@pytest.mark.parametrize("name", PLUGIN_MISUSE)
def test_plugin_misuse_names_the_problem(pytester, name):
    body, match = PLUGIN_MISUSE[name]
    marker = "@pytest.mark.equivcheck('oops')\n" if "marker" in name else ""
    pytester.makepyfile(f"import pytest\n\n{marker}def test_it(equivcheck):\n    {body}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret != 0 and match in out, out

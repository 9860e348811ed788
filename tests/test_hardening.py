"""Bad input, catalogued: each gives one clear line and leaves no partial or changed file.

API: an EquivcheckError subclass. CLI: exit 2, one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import string
import sys

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
    "complex kernel": (lambda: ec.convert(SRC, DST, GOOD.astype(np.complex64)), "kernel dtype=complex64 is not a real numeric"),
    "complex bias": (lambda: ec.convert(SRC, DST, GOOD, np.zeros(6, np.complex128)), "bias dtype=complex128"),
    "object array applied": (lambda: ec.plan(SRC, DST).apply(np.empty((60, 6), object)), "array dtype=object"),
    "void array applied": (lambda: ec.plan(SRC, DST).apply(np.zeros((60, 6), "V2")), "array dtype=|V2"),
    "structured array applied": (lambda: ec.plan(SRC, DST).apply(np.zeros((60, 6), [("a", "f4")])), "dtype=[('a', '<f4')]"),
    "text array applied": (lambda: ec.plan(SRC, DST).apply(np.full((60, 6), "x")), "array dtype=<U1"),
    "dates applied": (lambda: ec.plan(SRC, DST).apply(np.zeros((60, 6), "M8[s]")), "array dtype=datetime64[s]"),
    "bytes applied": (lambda: ec.plan(SRC, DST).apply(np.zeros((60, 6), "S4")), "array dtype=|S4"),
    "a list applied": (lambda: ec.plan(SRC, DST).apply(GOOD.tolist()), "type=builtins.list is not supported"),
    "out of another dtype": (lambda: ec.plan(SRC, DST).apply(GOOD, out=np.empty(DST.kernel_shape, np.float64)), "dtype=float64"),
    "out of another shape": (lambda: ec.plan(SRC, DST).apply(GOOD, out=np.empty((6, 60), np.float32)), "expected shape=(6, 3, 4, 5)"),
    "out overlapping the input": (lambda: ec.plan(SRC, DST).apply(GOOD, out=GOOD.reshape(DST.kernel_shape)), "out overlaps the input"),
    "read-only out": (lambda: ec.plan(SRC, DST).apply(GOOD, out=_read_only(np.empty(DST.kernel_shape, np.float32))),
                      "not a writeable C-contiguous"),
    "strided out": (lambda: ec.plan(SRC, DST).apply(GOOD, out=np.empty((6, 3, 4, 10), np.float32)[..., ::2]),
                    "not a writeable C-contiguous"),
    "out as a list": (lambda: ec.plan(SRC, DST).apply(GOOD, out=[0] * 360), "out= takes a numpy array"),
    "converter returning an object bias": (
        lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (ec.convert(SRC, DST, k)[0], np.empty(6, object))),
        "converter's bias dtype=object",
    ),
    "converter returning a complex bias": (
        lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (ec.convert(SRC, DST, k)[0], b.astype(np.complex64))),
        "converter's bias dtype=complex64",
    ),
    "converter returning a text kernel": (
        lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (np.full(DST.kernel_shape, "w"), b)), "converter's kernel dtype=<U1",
    ),
    "converter returning a ragged bias": (
        lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (ec.convert(SRC, DST, k)[0], [[1.0], [1.0, 2.0]])),
        "bias that is not an array",
    ),
    "converter returning no kernel": (lambda: ec.verify_pair(SRC, DST, converter=lambda k, b: (None, b)), "kernel of shape=None"),
    "mapping from a dict with an unknown op": (
        lambda: ec.Mapping.from_dict({"in_shape": [2], "ops": [{"op": "rotate"}]}), "op='rotate' is not one of",
    ),
    "mapping from a dict missing a field": (lambda: ec.Mapping.from_dict({"ops": []}), "missing or mistypes a field"),
}


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", API_CASES)
def test_api_bad_input(name):
    build, match = API_CASES[name]
    with pytest.raises(EquivcheckError, match=re.escape(match)) as info:
        build()
    assert "\n" not in str(info.value)


# -- memory safety of the mapping engine ---------------------------------------------------------
BIG = dict(channels=512, spatial=(7, 7), units=32)  # a 6.4 MB object kernel: past the 4 MiB compiled-kernel threshold


def run_python(code, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_big_object_arrays_are_refused_in_both_directions():
    code = f"""
import numpy as np, equivcheck as ec
m = ec.plan(ec.spec("keras:dense", **{BIG}), ec.spec("torch:conv", **{BIG}))
for mapping in (m, m.inverse()):
    x = np.empty(mapping.in_shape, object)
    x[...] = [[object()]]
    try:
        mapping.apply(x)
    except ec.MappingError as exc:
        print(exc)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr  # a segfault is -11
    assert done.stdout.count("array dtype=object is not a real numeric type") == 2


@pytest.mark.parametrize("direction", ["dense->conv", "conv->dense"])
@pytest.mark.parametrize("dtype", ["V8", "complex64", "complex128", "f4,f4", "U2", "S8", "m8[s]", "M8[D]"])
def test_big_arrays_of_no_real_numbers_never_reach_the_compiled_kernel(dtype, direction):
    m = ec.plan(ec.spec("keras:dense", **BIG), ec.spec("torch:conv", **BIG))
    m = m if direction == "dense->conv" else m.inverse()
    x = np.zeros(m.in_shape, dtype)
    assert x.nbytes > 1 << 22  # the size that takes the compiled path
    with pytest.raises(ec.MappingError, match=re.escape(f"array dtype={str(np.dtype(dtype))[:60]} is not a real numeric")) as info:
        m.apply(x)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("direction", ["dense->conv", "conv->dense"])
def test_big_complex_torch_tensors_are_refused(direction):
    torch = pytest.importorskip("torch", reason="torch tensors")
    m = ec.plan(ec.spec("keras:dense", **BIG), ec.spec("torch:conv", **BIG))
    m = m if direction == "dense->conv" else m.inverse()
    with pytest.raises(ec.MappingError, match=re.escape("array dtype=torch.complex64 is not a real numeric")):
        m.apply(torch.zeros(m.in_shape, dtype=torch.complex64))


@pytest.mark.parametrize("direction", ["dense->conv", "conv->dense"])
@pytest.mark.parametrize("dtype", ["float32", ">f4", "float16", "int8", "bool", "bfloat16"])
def test_big_real_arrays_of_every_item_size_round_trip(dtype, direction):
    import ml_dtypes

    m = ec.plan(ec.spec("keras:dense", **BIG), ec.spec("torch:conv", **BIG))
    m = m if direction == "dense->conv" else m.inverse()
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = (np.arange(np.prod(m.in_shape)) % 97).reshape(m.in_shape).astype(dt)
    y = m.apply(x)
    assert y.dtype == x.dtype and y.flags.c_contiguous
    assert np.array_equal(m.inverse().apply(y), x)
    assert np.array_equal(y, m.apply(x.copy(order="F")))  # the compiled path agrees with the general one


def test_compiled_kernel_takes_only_plain_integer_buffers():
    fast = pytest.importorskip("equivcheck._fastcopy", reason="the compiled kernel was not built")
    rows = np.arange(3, dtype=np.int64)
    for src, dst in ((np.empty((3, 4), object), np.empty((4, 3), object)), (GOOD[:3, :4].copy(), np.empty((4, 3), np.float32))):
        with pytest.raises(TypeError, match="plain integers"):
            fast.gather_transpose(src, 4, rows, dst, 3, 0, src.itemsize)
        with pytest.raises(TypeError, match="plain integers"):
            fast.scatter_transpose(src, 4, rows, dst, 0, src.itemsize)


def test_apply_after_fork_does_not_hang():
    code = f"""
import multiprocessing, os, numpy as np, equivcheck as ec
m = ec.plan(ec.spec("keras:dense", **{BIG}), ec.spec("torch:conv", **{BIG}))
x = np.ones(m.in_shape, np.float32)
m.apply(x)  # starts the copy threads in the parent

def child():
    assert m.inverse().apply(m.apply(x)).sum() == x.size

pid = os.fork()
if pid == 0:
    child()
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
p = multiprocessing.get_context("fork").Process(target=child)
p.start(); p.join(20)
print("exit", p.exitcode)
"""
    done = run_python(code, timeout=40)
    assert done.returncode == 0 and done.stdout.strip() == "exit 0", done.stderr[-500:]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("direction", ["dense->conv", "conv->dense"])
def test_a_reshape_only_mapping_returns_a_new_array_unless_out_is_given(kind, direction):
    m = ec.plan(ec.spec("torch:dense", **SMALL), ec.spec("torch:conv", **SMALL))
    m = m if direction == "dense->conv" else m.inverse()
    assert m.is_reshape
    x = np.arange(360, dtype=np.float32).reshape(m.in_shape)
    if kind == "torch":
        torch = pytest.importorskip("torch", reason="torch tensors")
        x = torch.from_numpy(x)
        y = m.apply(x)
        assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        with pytest.raises(ec.MappingError, match="out= takes a numpy array for a numpy input"):
            m.apply(x, out=np.empty(m.out_shape, np.float32))
    else:
        y = m.apply(x)
        assert not np.shares_memory(x, y)
        out = np.empty(m.out_shape, np.float32)
        assert m.apply(x, out=out) is out and np.array_equal(out, y)  # written where asked
    y += 1
    assert float(x.sum()) == sum(range(360))  # the caller's array is untouched


def test_results_never_alias_the_inputs():
    src, dst = ec.spec("torch:dense", **SMALL), ec.spec("torch:conv", **SMALL)  # a reshape-only pair
    kernel, bias = GOOD.T.copy(), np.ones(6, np.float32)
    assert ec.plan(src, dst).is_reshape
    new_kernel, new_bias = ec.convert(src, dst, kernel, bias)
    assert not np.shares_memory(new_kernel, kernel) and not np.shares_memory(new_bias, bias)
    torch = pytest.importorskip("torch", reason="torch tensors")
    kernel, bias = torch.from_numpy(kernel), torch.from_numpy(bias)
    new_kernel, new_bias = ec.convert(src, dst, kernel, bias)
    assert new_bias is not bias and new_bias.data_ptr() != bias.data_ptr()
    assert new_kernel.untyped_storage().data_ptr() != kernel.untyped_storage().data_ptr()
    new_kernel += 1
    assert float(kernel.sum()) == float(GOOD.sum(dtype=np.float32))


def test_torch_parameters_and_bfloat16_convert():
    torch = pytest.importorskip("torch", reason="torch tensors")
    kernel = torch.nn.Parameter(torch.from_numpy(GOOD.copy()))
    assert tuple(ec.convert(SRC, DST, kernel)[0].shape) == DST.kernel_shape
    new_kernel, new_bias = ec.convert(SRC, DST, kernel.detach().bfloat16(), torch.zeros(6, dtype=torch.bfloat16))
    assert new_kernel.dtype == new_bias.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("kind, match", [("complex", "dtype=torch.complex64"), ("sparse", "sparse_coo torch tensor"),
                                         ("meta", "meta torch tensor"), ("quantized", "quantized torch tensor")])
def test_torch_tensors_without_plain_values_are_refused(kind, match):
    torch = pytest.importorskip("torch", reason="torch tensors")
    k = torch.from_numpy(GOOD.copy())
    bad = {"complex": lambda: k.to(torch.complex64), "sparse": k.to_sparse, "meta": lambda: k.to("meta"),
           "quantized": lambda: torch.quantize_per_tensor(k, 0.1, 0, torch.qint8)}[kind]()
    with pytest.raises(EquivcheckError, match=re.escape(match)) as info:
        ec.convert(SRC, DST, bad)
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


# -- strict flags: each a usage error, one line, exit 2, nothing written --------------------------
PLAN = ["plan", "--from", "keras:dense", "--to", "torch:conv", *SMALL_FLAGS]
CONV_PLAN = ["plan", "--from", "torch:conv", "--to", "keras:conv", "--channels", "4", "--spatial", "4,5", "--units", "6"]
DENSE_PLAN = ["plan", "--from", "keras:dense", "--to", "torch:dense", *SMALL_FLAGS]
DEPTHWISE_PLAN = ["plan", "--from", "keras:depthwise", "--to", "torch:depthwise", "--channels", "3", "--spatial", "4,5"]
CLI_CASES = {
    "spatial 4,x": ([*PLAN, "--spatial", "4,x"], "'4,x' is not a comma-separated list of integers"),
    "spatial 4,,5": ([*PLAN, "--spatial", "4,,5"], "'4,,5' is not a comma-separated list"),
    "spatial trailing comma": ([*PLAN, "--spatial", "4,"], "'4,' is not a comma-separated list"),
    "spatial leading comma": ([*PLAN, "--spatial", ",4"], "',4' is not a comma-separated list"),
    "spatial a float": ([*PLAN, "--spatial", "4.5"], "'4.5' is not a comma-separated list"),
    "spatial in e-notation": ([*PLAN, "--spatial", "1e2"], "'1e2' is not a comma-separated list"),
    "spatial negative": ([*PLAN, "--spatial=-4"], "'-4' is not a comma-separated list"),
    "spatial empty": ([*PLAN, "--spatial="], "'' is not a comma-separated list"),
    "kernel size with a letter": ([*CONV_PLAN, "--kernel-size", "2,a"], "'2,a' is not a comma-separated list"),
    "stride with a semicolon": ([*CONV_PLAN, "--stride", "2;2"], "'2;2' is not a comma-separated list"),
    "dilation empty": ([*CONV_PLAN, "--dilation="], "'' is not a comma-separated list"),
    "padding with a hole": ([*CONV_PLAN, "--padding", "1,,1"], "'1,,1' is not a comma-separated list"),
    "padding misspelt": ([*CONV_PLAN, "--padding", "sam"], "'sam' is not a comma-separated list"),
    "channels a float": ([*PLAN, "--channels", "3.0"], "invalid int value: '3.0'"),
    "units in hex": ([*PLAN, "--units", "0x10"], "invalid int value: '0x10'"),
    "groups a word": ([*CONV_PLAN, "--groups", "two"], "invalid int value: 'two'"),
    "multiplier a float": ([*DEPTHWISE_PLAN, "--multiplier", "1.5"], "invalid int value: '1.5'"),
    "negative seed": (["verify", "--from", "keras:dense", "--to", "torch:conv", *SMALL_FLAGS, "--seed=-1"],
                      "'-1' is not a non-negative integer seed"),
    "float seed": (["verify", "--from", "keras:dense", "--to", "torch:conv", *SMALL_FLAGS, "--seed", "1.5"],
                   "'1.5' is not a non-negative integer seed"),
    "zero channels": ([*PLAN, "--channels", "0"], "channels=0"),
    "zero units": ([*PLAN, "--units", "0"], "units=0"),
    "zero stride": ([*CONV_PLAN, "--stride", "0", "--kernel-size", "2"], "stride"),
    "multiplier on a conv target": ([*PLAN, "--multiplier", "2"], "multiplier does not apply to keras:dense -> torch:conv"),
    "kernel size on dense->dense": ([*DENSE_PLAN, "--kernel-size", "2"], "kernel_size does not apply to keras:dense -> torch:dense"),
    "stride on dense->dense": ([*DENSE_PLAN, "--stride", "2"], "stride does not apply to keras:dense -> torch:dense"),
    "dilation on dense->dense": ([*DENSE_PLAN, "--dilation", "2"], "dilation does not apply"),
    "padding on dense->dense": ([*DENSE_PLAN, "--padding", "same"], "padding does not apply"),
    "groups on dense->dense": ([*DENSE_PLAN, "--groups", "1"], "groups does not apply"),
    "output padding on dense->dense": ([*DENSE_PLAN, "--output-padding", "1"], "output_padding does not apply"),
    "output padding on a conv": ([*PLAN, "--output-padding", "1"], "output_padding does not apply to keras:dense -> torch:conv"),
    "groups on depthwise": ([*DEPTHWISE_PLAN, "--groups", "3"], "groups does not apply to keras:depthwise -> torch:depthwise"),
    "zero multiplier": ([*DEPTHWISE_PLAN, "--multiplier", "0"], "out_channels=0"),
    "units no multiple of depthwise channels": ([*DEPTHWISE_PLAN, "--units", "7"], "units=7 is not a multiple of channels=3"),
    "explore past the spec limit": (["explore", "--from", "keras:dense", "--to", "torch:conv", "--channels", "65536",
                                     "--spatial", "1024,1024", "--units", "4"], "more than the limit of 17179869184"),
    "verify past the memory": (["verify", "--from", "caffe:dense", "--to", "caffe:conv", "--channels", "2048",
                                "--spatial", "64,64", "--units", "512"], "more than half of this machine"),
    "convert a missing file": (["convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL_FLAGS, "missing.npz",
                                "out.npz"], "missing.npz"),
    "report of a missing file": (["report", "missing.json"], "does not exist"),
    "depthwise with zero channels": ([*DEPTHWISE_PLAN[:-4], "--channels", "0", "--spatial", "4,5", "--units", "6"],
                                     "channels=0 must be a positive integer"),
    "channels in another script's digits": ([*PLAN, "--channels", "\uff13"], "invalid int value"),
    "channels with an underscore": ([*PLAN, "--channels", "1_0"], "invalid int value: '1_0'"),
    "spatial in another script's digits": ([*PLAN, "--spatial", "\uff14,\uff15"], "is not a comma-separated list"),
    "explore past the memory": (["explore", "--from", "keras:dense", "--to", "torch:conv", "--channels", "4096",
                                 "--spatial", "64,64", "--units", "1024"], "more than half of this machine"),
    "explore a huge map to one unit": (["explore", "--from", "keras:dense", "--to", "torch:conv", "--channels", "100000",
                                        "--spatial", "100,100", "--units", "1"], "more than half of this machine"),
    "unknown command": (["nonsense"], "invalid choice: 'nonsense'"),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_flags_are_one_line(tmp_path, monkeypatch, capsys, name):
    argv, words = CLI_CASES[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("untouched")
    before = snapshot(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.startswith("equivcheck: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err
    assert snapshot(tmp_path) == before


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
    # in a subprocess: an in-process run drops the modules it imported, and onnx's native extension, imported a
    # second time later in this process, aborts it ("Critical nanobind error: refusing to add duplicate key")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret != 0 and match in out, out


@pytest.mark.parametrize(("returned", "words"), [
    (lambda k: "abc", "dtype=<U3"), (lambda k: np.empty(k.shape, object), "dtype=object"),
    (lambda k: [[1, 2], [3]], "not an array"), (lambda k: k.astype(np.complex64), "dtype=complex64"),
])
def test_a_converter_returning_no_real_array_is_one_line(returned, words):
    src = ec.spec("keras:dense", channels=2, spatial=(3, 3), units=2)
    dst = ec.spec("torch:conv", channels=2, spatial=(3, 3), units=2)
    with pytest.raises(ec.EquivcheckError, match=re.escape(words)) as info:
        ec.verify_pair(src, dst, converter=lambda k, b: (returned(ec.convert(src, dst, k, b)[0]), b))
    assert "\n" not in str(info.value)


def test_verify_model_refuses_the_same_file_twice_before_loading_it(tmp_path, capsys):
    from equivcheck.cli import main

    path = tmp_path / "m.keras"
    path.write_bytes(b"not even read")
    assert main(["verify-model", str(path), str(tmp_path / "." / "m.keras")]) == 2
    assert "are the same file" in capsys.readouterr().err


# -- reports without jsonschema ------------------------------------------------------------------
EVIL = '<meta http-equiv="refresh" content="0;url=https://x.invalid"><script>alert(1)</script><img src=x onerror=alert(1)>'
LIVE = ('<meta http-equiv="refresh"', "<script>", "<img src=x")


def _poison(value, keys=False):
    """Every string in a report document (and, with ``keys``, every key) replaced by ``EVIL``."""
    if isinstance(value, dict):
        return {(EVIL + k if keys else k): v if k in ("schema_version", "state", "columns", "verdict", "outcome")
                else _poison(v, keys)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_poison(v, keys) for v in value]
    return EVIL if isinstance(value, str) else value


@pytest.mark.parametrize("where", ["every value", "the extra sections' keys"])
def test_every_report_field_is_escaped_without_jsonschema(tmp_path, capsys, monkeypatch, where):
    from equivcheck.report import write_report

    src, dst = ec.spec("caffe:dense", **SMALL), ec.spec("caffe:conv", **SMALL)  # numpy-run presets
    flipped = ec.verify_pair(src, dst, converter=lambda k, b: (ec.convert(src, ec.spec("theano:conv", **SMALL), k)[0], b))
    assert flipped.verdict == "fail"
    write_report(tmp_path, [ec.verify_pair(src, dst), flipped], seed=0, command="pytest",
                 extra={"pytest checks": [{"test": "t::a", "converter": "f", "verdict": "pass"}], "notes": {"a": "b"}})
    path = tmp_path / "equivcheck.json"
    doc = json.loads(path.read_text())
    if where == "every value":
        doc = _poison(doc)
    else:
        doc["extra"] = _poison(doc["extra"], keys=True)
    path.write_text(json.dumps(doc))
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # a base install: no validation at all
    assert main(["report", str(path)]) == 0, capsys.readouterr().err
    for name in ("equivcheck.md", "equivcheck.html"):
        text = (tmp_path / name).read_text()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, name  # the hostile text is there, inert
        if name.endswith(".md"):  # a code span shows its text as it is: only the text outside spans is markup
            text = outside_code(text)
        assert not [live for live in LIVE if live in text], name


def outside_code(markdown):
    """``markdown`` without its fenced blocks and inline code spans: the text a renderer reads as markup."""
    markdown = re.sub(r"^(`{3,})[^\n]*\n.*?^\1[ \t]*$", "", markdown, flags=re.S | re.M)
    return re.sub(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)", "", markdown)


@pytest.mark.parametrize("damage", ["a case without its verdict", "a summary that is a list", "cases that are a number"])
def test_a_report_of_the_wrong_shape_is_one_line_without_jsonschema(tmp_path, capsys, monkeypatch, damage):
    from equivcheck.report import write_report

    src, dst = ec.spec("caffe:dense", **SMALL), ec.spec("caffe:conv", **SMALL)
    write_report(tmp_path, [ec.verify_pair(src, dst)], seed=0, command="verify")
    path = tmp_path / "equivcheck.json"
    doc = json.loads(path.read_text())
    if damage == "a case without its verdict":
        del doc["cases"][0]["verdict"]
    elif damage == "a summary that is a list":
        doc["summary"] = []
    else:
        doc["cases"] = 7
    path.write_text(json.dumps(doc))
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    before = snapshot(tmp_path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


# -- the facts cache: a row decides verdicts, so the file is never trusted ---------------------------
FACTS_SPEC = ec.spec("caffe:dense", **SMALL)  # run by the numpy backend: probed in milliseconds


@pytest.fixture()
def facts_cache(tmp_path, monkeypatch):
    """A fresh disk cache in ``tmp_path/cache`` signed with a key in ``tmp_path/key``; yields the cache file."""
    from equivcheck.backends import probe

    monkeypatch.setenv("EQUIVCHECK_FACTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EQUIVCHECK_FACTS_KEY", str(tmp_path / "key" / "facts.key"))
    probe.clear_cache()
    yield tmp_path / "cache" / "facts.json"
    probe.clear_cache()


def _probe_warnings(dtype="float32"):
    import warnings

    from equivcheck.backends import probe

    probe.clear_cache()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        facts = probe.probe("numpy", FACTS_SPEC, dtype)
    return facts, [w for w in seen if issubclass(w.category, probe.FactsCacheWarning)]


def _edit_rows(path, edit):
    doc = json.loads(path.read_text())
    for digest in list(doc["rows"]):
        doc["rows"][digest] = edit(doc["rows"][digest])
    path.write_text(json.dumps(doc))


def _set(field, value):
    def edit(row):
        row["facts"][field] = value
        return row
    return edit


FACT_ROW_EDITS = {
    "a coarser accumulation for float32": _set("accumulate", "bf16x"),
    "tf32 sums": _set("accumulate", "tf32"),
    "the layer does not run": lambda row: {**row, "facts": {**row["facts"], "runs": False, "reason": "x", "accumulate": ""}},
    "float16 sums in float32": _set("accumulate", "float16"),
    "an unknown precision": _set("accumulate", "float8"),
    "a measured precision in float32": _set("accumulate", "2^-10"),
    "two roundings": _set("roundings", 2),
    "zero roundings": _set("roundings", 0),
    "roundings a bool": _set("roundings", True),
    "runs as a string": _set("runs", "yes"),
    "undecided": lambda row: {**row, "facts": {**row["facts"], "decided": False, "note": "x"}},
    "another backend's row": _set("backend", "torch"),
    "another dtype's row": _set("dtype", "float64"),
    "probed on another layer": _set("probed_on", "caffe:dense(channels=1)"),
    "an extra field": _set("loosen", 1.0),
    "a missing field": lambda row: {**row, "facts": {k: v for k, v in row["facts"].items() if k != "note"}},
    "a huge reason": _set("reason", "x" * 5000),
    "the signature dropped": lambda row: {k: v for k, v in row.items() if k != "mac"},
    "a signature of zeros": lambda row: {**row, "mac": "0" * 64},
    "the signature a number": lambda row: {**row, "mac": 7},
    "another key": lambda row: {**row, "key": {**row["key"], "dtype": "float64"}},
    "a row that is a string": lambda row: "float32 bf16x",
    "a row that is a list": lambda row: [row],
    "a row of null": lambda row: None,
}


@pytest.mark.parametrize("name", FACT_ROW_EDITS)
def test_an_edited_facts_row_is_ignored_with_one_warning_and_probed_again(facts_cache, name):
    fresh, warned = _probe_warnings()
    assert facts_cache.is_file() and not warned and fresh.runs and fresh.accumulate == "float32"
    _edit_rows(facts_cache, FACT_ROW_EDITS[name])
    again, warned = _probe_warnings()
    assert again == fresh  # what a fresh probe gives, never the edited row
    assert len(warned) == 1 and "\n" not in str(warned[0].message), [str(w.message) for w in warned]
    assert _probe_warnings() == (fresh, [])  # the row was re-probed and rewritten: trusted again, silently


def _write_cache_file(path, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    content = {
        "the number 5": "5", "a 400-digit exponent": "1e" + "9" * 400, "a 400-digit integer": "9" * 400,
        "NaN": '{"format": 2, "rows": {"a": NaN}}', "nesting 100000 deep": "[" * 100_000 + "]" * 100_000,
        "not UTF-8": b"\xff\xfe{", "empty": "", "truncated JSON": '{"format": 2, "rows": {', "rows a list": '{"format": 2, "rows": []}',
        "the old format": '{"0123456789abcdef01234567": {"backend": "numpy"}}', "a JSON string": '"facts"',
        "a huge float": '{"format": 2, "rows": {}, "x": 1e999}',
    }
    if kind in content:
        data = content[kind]
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    elif kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "larger than the limit":
        with open(path, "wb") as fh:
            fh.write(b'{"format": 2, "rows": {}}')
            fh.truncate(5 << 20)
    elif kind == "a symlink to another file":
        (path.parent / "elsewhere.json").write_text('{"format": 2, "rows": {}}')
        path.symlink_to(path.parent / "elsewhere.json")
    elif kind == "a dangling symlink":
        path.symlink_to(path.parent / "nowhere.json")
    else:
        raise AssertionError(kind)


CACHE_FILES = ["the number 5", "a 400-digit exponent", "a 400-digit integer", "NaN", "nesting 100000 deep", "not UTF-8",
               "truncated JSON", "rows a list", "the old format", "a JSON string", "a huge float", "a FIFO",
               "larger than the limit", "a symlink to another file"]


@pytest.mark.parametrize("kind", CACHE_FILES)
def test_an_unusable_facts_file_is_ignored_with_one_warning(facts_cache, kind):
    import time

    fresh, _ = _probe_warnings()
    _write_cache_file(facts_cache, kind)
    start = time.perf_counter()
    again, warned = _probe_warnings()
    assert time.perf_counter() - start < 10  # a FIFO does not hang
    assert again == fresh and len(warned) == 1 and "ignored" in str(warned[0].message), [str(w.message) for w in warned]
    assert facts_cache.is_file() and not facts_cache.is_symlink()  # replaced by a good file, not written through
    assert _probe_warnings() == (fresh, [])
    if kind == "a symlink to another file":
        assert (facts_cache.parent / "elsewhere.json").read_text() == '{"format": 2, "rows": {}}'


@pytest.mark.parametrize("kind", ["empty", "a dangling symlink"])
def test_an_empty_or_missing_facts_file_is_probed_silently_or_with_one_warning(facts_cache, kind):
    fresh, _ = _probe_warnings()
    _write_cache_file(facts_cache, kind)
    again, warned = _probe_warnings()
    assert again == fresh and len(warned) <= 1
    assert not (facts_cache.parent / "nowhere.json").exists()  # a dangling link's target is never created


def test_a_facts_folder_in_place_of_the_file_is_one_warning_and_no_traceback(facts_cache):
    fresh, _ = _probe_warnings()
    _write_cache_file(facts_cache, "a folder")
    again, warned = _probe_warnings()
    assert again == fresh and 1 <= len(warned) <= 2 and all("\n" not in str(w.message) for w in warned)


def test_a_poisoned_row_would_pass_a_wrong_conversion_but_is_refused(facts_cache):
    """The finding: a coarser float32 accumulation in the cache let a kernel with one weight 5 % off pass."""
    from equivcheck.backends import probe

    src, dst = ec.spec("caffe:dense", **SMALL), ec.spec("caffe:conv", **SMALL)

    def off(k, b):
        k2, b2 = ec.convert(src, dst, k, b)
        k2 = np.array(k2)
        k2.flat[7] *= 1.05
        return k2, b2

    assert ec.verify_pair(src, dst, converter=off).verdict == "fail"
    _edit_rows(facts_cache, _set("accumulate", "bf16x"))
    probe.clear_cache()
    with pytest.warns(probe.FactsCacheWarning, match="not signed by this machine's key"):
        assert ec.verify_pair(src, dst, converter=off).verdict == "fail"
    loose = {k: probe.Facts(**{**v.to_dict(), "accumulate": "bf16x", "roundings": 2}) for k, v in probe._CACHE.items()}
    probe._CACHE.update(loose)  # had the edit been trusted, the same wrong kernel would pass
    assert ec.verify_pair(src, dst, converter=off).verdict == "pass"


def test_rows_signed_on_another_machine_are_probed_again(facts_cache, tmp_path, monkeypatch):
    fresh, _ = _probe_warnings()
    monkeypatch.setenv("EQUIVCHECK_FACTS_KEY", str(tmp_path / "other-machine.key"))
    again, warned = _probe_warnings()
    assert again == fresh and len(warned) == 1 and "not signed" in str(warned[0].message)


def test_a_key_inside_the_cache_folder_turns_the_disk_cache_off(facts_cache, monkeypatch):
    monkeypatch.setenv("EQUIVCHECK_FACTS_KEY", str(facts_cache.parent / "facts.key"))
    fresh, warned = _probe_warnings()
    assert fresh.runs and len(warned) == 1 and "inside the cache folder" in str(warned[0].message)
    assert not facts_cache.exists() and not (facts_cache.parent / "facts.key").exists()


@pytest.mark.parametrize("damage", ["group-writable", "not hex", "a FIFO"])
def test_an_unusable_key_turns_the_disk_cache_off_with_one_warning(facts_cache, tmp_path, damage):
    key = tmp_path / "key" / "facts.key"
    key.parent.mkdir()
    if damage == "a FIFO":
        os.mkfifo(key)
    else:
        key.write_text("zz" * 32 if damage == "not hex" else "ab" * 32)
        key.chmod(0o666 if damage == "group-writable" else 0o600)
    fresh, warned = _probe_warnings()
    assert fresh.runs and len(warned) == 1 and "cannot be used" in str(warned[0].message)
    assert not facts_cache.exists()


def test_the_facts_cache_never_writes_through_a_planted_symlink(facts_cache, tmp_path):
    """The temporary name was ``.facts.json.<pid>``, opened without O_EXCL/O_NOFOLLOW: a link there was written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    facts_cache.parent.mkdir(parents=True)
    for name in (f".facts.json.{os.getpid()}", f".facts.json.{os.getpid()}.tmp", "facts.json.tmp"):
        (facts_cache.parent / name).symlink_to(victim)
    fresh, warned = _probe_warnings()
    assert fresh.runs and not warned
    assert victim.read_text() == "precious" and facts_cache.is_file() and not facts_cache.is_symlink()
    assert stat_mode(facts_cache) == 0o600 and stat_mode(tmp_path / "key" / "facts.key") == 0o600
    leftovers = sorted(p.name for p in facts_cache.parent.iterdir() if not p.is_symlink())
    assert leftovers == ["facts.json"], leftovers


def stat_mode(path):
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_facts_key_covers_everything_the_probe_depends_on(facts_cache, monkeypatch):
    from equivcheck import backends
    from equivcheck.backends import probe

    fresh = probe.probe("numpy", FACTS_SPEC, "float32")
    key = json.loads(facts_cache.read_text())["rows"].popitem()[1]["key"]
    assert set(key) == {"environment", "spec", "dtype", "probe", "code", "versions"}
    assert "numpy" in key["versions"] and f"seed={probe._SEED}" in key["probe"] and key["spec"] == repr(FACTS_SPEC)
    numpy = backends.get("numpy")
    before = probe._digest(probe._row_key((key["environment"], FACTS_SPEC, "float32"), numpy))
    monkeypatch.setattr(probe, "PROBE_VERSION", probe.PROBE_VERSION + " changed")  # the probe's design
    assert probe._digest(probe._row_key((key["environment"], FACTS_SPEC, "float32"), numpy)) != before
    monkeypatch.setattr(probe, "PROBE_VERSION", probe.PROBE_VERSION.removesuffix(" changed"))
    assert probe._digest(probe._row_key((key["environment"], FACTS_SPEC, "float32"), numpy)) == before
    probe._STATE["code"] = {"numpy": "edited"}  # the probe's, the bound's or the backend's code edited
    assert probe._digest(probe._row_key((key["environment"], FACTS_SPEC, "float32"), numpy)) != before
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # a kernel-steering variable: another row, probed again
    probe.clear_cache()
    again, warned = _probe_warnings()
    assert again == fresh and not warned and len(json.loads(facts_cache.read_text())["rows"]) == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)), st.sampled_from(["file", "row", "facts"]))
def test_fuzzed_facts_caches_never_change_the_facts(facts_cache, junk, where):
    import warnings

    from equivcheck.backends import probe

    probe.clear_cache()
    fresh = probe.probe("numpy", FACTS_SPEC, "float32")
    doc = json.loads(facts_cache.read_text())
    digest = next(iter(doc["rows"]))
    if where == "file":
        facts_cache.write_bytes(junk if isinstance(junk, bytes) else json.dumps(junk).encode())
    else:
        junk = junk.decode("latin-1") if isinstance(junk, bytes) else junk
        if where == "row":
            doc["rows"][digest] = junk
        else:
            doc["rows"][digest]["facts"] = junk
        facts_cache.write_text(json.dumps(doc))
    probe.clear_cache()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert probe.probe("numpy", FACTS_SPEC, "float32") == fresh
    assert len(seen) <= 1


# -- reports: the verdict comes from the cases, code is shown as it is ------------------------------
def _report_doc():
    """A written report of one passing and one failing case (caffe layers: run by numpy)."""
    from equivcheck.report.jsonio import build_document
    from equivcheck.report.records import case_record

    if "doc" not in _REPORT:
        src, dst = ec.spec("caffe:dense", **SMALL), ec.spec("caffe:conv", **SMALL)
        flipped = ec.verify_pair(src, dst, converter=lambda k, b: (ec.convert(src, ec.spec("theano:conv", **SMALL), k)[0], b))
        _REPORT["doc"] = build_document([case_record(ec.verify_pair(src, dst)), case_record(flipped)], seed=0,
                                        command="verify", run_id="r1")
    return json.loads(json.dumps(_REPORT["doc"]))


_REPORT: dict = {}


def _summary_edit(path, value):
    def edit(doc):
        node = doc["summary"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return doc
    return edit


def _case_edit(field, value):
    def edit(doc):
        doc["cases"][1][field] = value
        return doc
    return edit


LYING_REPORTS = {
    "summary says pass over a failing case": (_summary_edit(["verdict"], "pass"), "summary verdict=\"pass\""),
    "summary says ok": (_summary_edit(["ok"], True), "summary ok=true"),
    "summary counts no failure": (_summary_edit(["verdicts", "fail"], 0), "summary verdicts="),
    "summary counts two passes": (_summary_edit(["verdicts", "pass"], 2), "summary verdicts="),
    "summary counts three cases": (_summary_edit(["cases"], 3), "summary cases=3"),
    "summary counts no mutation": (_summary_edit(["mutations"], {"rejected": 0, "not rejected": 0, "ambiguous": 0}),
                                   "summary mutations="),
    "summary says skip": (_summary_edit(["verdict"], "skip"), "summary verdict=\"skip\""),
    "summary verdict unknown": (_summary_edit(["verdict"], "great"), "verdict"),
    "a failing case turned to pass, summary left": (_case_edit("verdict", "pass"), "disagrees with its cases"),
    "a case dropped, summary left": (lambda doc: {**doc, "cases": doc["cases"][:1]}, "disagrees with its cases"),
    "a case duplicated": (lambda doc: {**doc, "cases": [*doc["cases"], doc["cases"][0]]}, "disagrees with its cases"),
    "a case verdict of hostile HTML": (_case_edit("verdict", EVIL), "disagrees|does not match"),
    "a mutation outcome changed": (lambda doc: doc["cases"][0]["mutations"][0].update(outcome="not rejected") or doc,
                                   "disagrees|does not match"),
}


@pytest.mark.parametrize("schema", ["with jsonschema", "without jsonschema"])
@pytest.mark.parametrize("name", LYING_REPORTS)
def test_a_report_whose_summary_disagrees_with_its_cases_is_refused(tmp_path, capsys, monkeypatch, name, schema):
    edit, words = LYING_REPORTS[name]
    if schema == "without jsonschema":
        monkeypatch.setitem(sys.modules, "jsonschema", None)
    path = tmp_path / "equivcheck.json"
    path.write_text(json.dumps(edit(_report_doc())))
    before = snapshot(tmp_path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("equivcheck: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(words, err), err
    assert snapshot(tmp_path) == before


def test_a_failed_run_may_say_fail_over_passing_cases(tmp_path, capsys):
    from equivcheck.report.jsonio import build_document
    from equivcheck.report.records import case_record

    src, dst = ec.spec("caffe:dense", **SMALL), ec.spec("caffe:conv", **SMALL)
    doc = build_document([case_record(ec.verify_pair(src, dst))], run_id="r2", failed=True)
    assert doc["summary"]["verdict"] == "fail" and not doc["summary"]["ok"]
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "equivcheck.json")]) == 0, capsys.readouterr().err
    assert "Verdict: ❌" in (tmp_path / "equivcheck.md").read_text()
    doc["summary"]["verdict"] = "inconclusive"  # neither what the cases give nor a failed run's verdict
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "equivcheck.json")]) == 2


def test_the_rebuilt_page_states_the_verdict_of_the_cases(tmp_path, capsys):
    doc = _report_doc()
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "equivcheck.json")]) == 0, capsys.readouterr().err
    md = (tmp_path / "equivcheck.md").read_text()
    assert "**Verdict: ❌ fail**" in md or "**Verdict: ❌**" in md, md[:300]
    assert "Verdict: ✅" not in md and "Verdict: ✅" not in (tmp_path / "equivcheck.html").read_text()


CODE_TEXTS = {
    "a mapping with brackets": "w.T.reshape(2, 3, 5, 5)[:, :, ::-1, ::-1]",
    "a link-like text": "[click](https://x.invalid)",
    "backslashes": "a\\b\\\\c",
    "one backtick": "a`b",
    "three backticks": "a```b",
    "a leading backtick": "`a",
    "angle brackets": "x<y>&z",
    "a pipe": "a|b",
}


@pytest.mark.parametrize("name", CODE_TEXTS)
def test_code_spans_show_their_text_as_it_is(name):
    from equivcheck.report.markdown import code

    text = CODE_TEXTS[name]
    span = code(text)
    fence = re.match(r"`+", span).group()
    assert span.startswith(fence) and span.endswith(fence) and "`" * (len(fence) + 1) not in span.replace(fence + " ", "")
    inner = span[len(fence):-len(fence)]
    assert inner.strip(" ") == text or inner[1:-1] == text  # never escaped: no backslash added, nothing replaced


def test_a_failures_right_mapping_is_one_unescaped_code_span():
    from equivcheck.report.markdown import render

    doc = _report_doc()
    text = render(doc)
    mapping = doc["cases"][1]["mapping"]["code"]["numpy"]
    assert f"- right mapping: `{mapping}`" in text, [line for line in text.splitlines() if "right mapping" in line]
    assert "\\[" not in text.split("## Failures")[1].split("## Cases")[0].split("right mapping")[1].splitlines()[0]


@pytest.mark.parametrize("block", ["x = 1", "s = '```'", "s = '````'", "# [not](a link) <b>\nw[::-1]"])
def test_fenced_code_is_never_escaped_and_never_closed_early(block):
    from equivcheck.report.markdown import fenced

    lines = fenced(block, "python")
    fence = lines[0].removesuffix("python")
    assert lines[1] == block and lines[-1] == fence and len(fence) >= 3
    assert fence not in block


def test_text_outside_code_is_escaped():
    from equivcheck.report.markdown import md

    assert md("[a](b) <i>`x`</i>") == "\\[a\\](b) &lt;i&gt;\\`x\\`&lt;/i&gt;"


def _set_path(doc, path, value):
    node = doc
    for key in path[:-1]:
        if (key not in node) if isinstance(node, dict) else not isinstance(key, int):
            return doc  # an earlier edit replaced what the path runs through (a dict by a list, or the key gone)
        node = node[key] if isinstance(node, dict) else node[key % len(node)] if node else node
        if not isinstance(node, (dict, list)) or not node:
            return doc
    if isinstance(node, dict):
        node[path[-1] if isinstance(path[-1], str) else next(iter(node))] = value
    elif isinstance(node, list) and node:
        node[path[-1] % len(node) if isinstance(path[-1], int) else 0] = value
    return doc


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
                                     st.sampled_from(["pass", "fail", "skip", "error", "inconclusive", EVIL, ""])),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)
REPORT_PATHS = [["summary", "verdict"], ["summary", "ok"], ["summary", "verdicts", "pass"], ["summary", "cases"],
                ["summary", "mutations"], ["cases", 0, "verdict"], ["cases", 1, "verdict"], ["cases", 1, "mutations"],
                ["cases", 0, "comparison"], ["cases", 1, "mapping"], ["cases"], ["summary"], ["extra"], ["run", "command"],
                ["conventions", "rows"], ["cases", 0, "source"], ["environment"], ["pictures"]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(REPORT_PATHS), JSON_VALUES), min_size=1, max_size=3), st.booleans())
def test_fuzzed_report_json_renders_the_cases_verdict_or_is_one_line(tmp_path_factory, capsys, edits, schema):
    from equivcheck.report.describe import verdict_of

    folder = tmp_path_factory.mktemp("report")
    doc = _report_doc()
    for path, value in edits:
        doc = _set_path(doc, path, value)
    path = folder / "equivcheck.json"
    path.write_text(json.dumps(doc))
    saved = sys.modules.get("jsonschema")
    if not schema:
        sys.modules["jsonschema"] = None
    try:
        code = main(["report", str(path)])
    finally:
        if not schema:
            if saved is None:
                sys.modules.pop("jsonschema", None)
            else:
                sys.modules["jsonschema"] = saved
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and sorted(p.name for p in folder.iterdir()) == ["equivcheck.json"], err
        return
    cases = doc["cases"]
    want = verdict_of([c.get("verdict", "error") for c in cases], doc.get("extra") if isinstance(doc.get("extra"), dict) else None)
    if doc["summary"].get("verdict") == "fail" and not doc["summary"].get("ok", True):
        want = "fail"  # a run that failed for a reason of its own
    first = (folder / "equivcheck.md").read_text().splitlines()[2]
    assert first.startswith("**Verdict: ") and {"pass": "✅", "fail": "❌"}.get(want, "") in first, (want, first)


# -- standard output that cannot be written, names that are not UTF-8 -------------------------------
FULL_COMMANDS = {
    "plan --json": [*PLAN, "--json"],
    "plan": PLAN,
    "presets": ["presets"],
    "backends --json": ["backends", "--json"],
    "backends": ["backends"],
    "--help": ["--help"],
    "plan --help": ["plan", "--help"],
}


@pytest.mark.parametrize("name", FULL_COMMANDS)
def test_a_full_standard_output_is_one_line_and_exit_2(name):
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.fail("this check needs /dev/full (Linux)")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "equivcheck", *FULL_COMMANDS[name]], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("equivcheck: error: standard output cannot be written (No space left on device): its output "
                           "is incomplete; free space or write somewhere else\n"), done.stderr


def test_a_closed_pipe_is_one_line_and_exit_2():
    import subprocess

    read, write = os.pipe()
    os.close(read)
    done = subprocess.run([sys.executable, "-m", "equivcheck", "presets"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Broken pipe" in done.stderr, done.stderr


class _Failing:
    """A stdout whose writes fail as a full disk does."""

    encoding = "utf-8"

    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("argv", [[*PLAN, "--json"], ["presets"], ["backends"]])
def test_a_failing_stdout_in_process_is_one_line(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "stdout", _Failing())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("equivcheck: error: standard output cannot be written") and err.count("\n") == 1, err
    assert isinstance(sys.stdout, _Failing)  # restored


def test_an_ascii_stdout_prints_a_non_ascii_name_escaped(tmp_path, weights):
    import subprocess

    out = tmp_path / "ausgabe-ü.npz"
    done = subprocess.run([sys.executable, "-m", "equivcheck", *convert_args(weights, out)], capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert out.is_file() and b"ausgabe-\\xfc.npz" in done.stdout, done.stdout  # escaped, not a UnicodeEncodeError


NOT_UTF8 = "out\udcff.npz"  # the bytes b"out\xff.npz", as Python decodes a name that is not UTF-8
NOT_UTF8_CASES = {
    "convert output": lambda tmp, w: convert_args(w, tmp / NOT_UTF8),
    "convert input": lambda tmp, w: convert_args(tmp / NOT_UTF8, tmp / "out.npz"),
    "report": lambda tmp, w: ["report", str(tmp / "eq\udcff.json")],
    "explore source": lambda tmp, w: ["explore", "--source", str(tmp / "m\udcff.onnx"), "--to", "torch:dense", "--channels", "3"],
    "verify report folder": lambda tmp, w: ["verify", "--from", "caffe:dense", "--to", "caffe:conv", *SMALL_FLAGS,
                                            "--report", str(tmp / "r\udcff")],
    "a flag value": lambda tmp, w: [*PLAN, "--spatial", "4,\udcff"],
}


@pytest.mark.parametrize("name", NOT_UTF8_CASES)
def test_a_name_that_is_not_utf8_is_one_line_before_anything_is_written(tmp_path, capsys, weights, name):
    argv = NOT_UTF8_CASES[name](tmp_path, weights)
    before = snapshot(tmp_path)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not valid UTF-8" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_a_name_that_is_not_utf8_in_a_subprocess_is_one_line(tmp_path, weights):
    import subprocess

    out = os.fsencode(str(tmp_path)) + b"/out\xff.npz"
    argv = [os.fsencode(a) for a in [sys.executable, "-m", "equivcheck", *convert_args(weights, "x")][:-1]] + [out]
    done = subprocess.run(argv, capture_output=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1 and b"not valid UTF-8" in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["dense.npz"]


# -- MODULE:FACTORY: no code from the working folder shadows an installed package ---------------------
@pytest.fixture()
def planted(tmp_path, monkeypatch):
    """A working folder holding ``colorsys.py`` (an installed module's name) and ``mymodels.py``, each leaving a mark."""
    for name in ("colorsys", "mymodels"):
        (tmp_path / f"{name}.py").write_text(
            f"open({str(tmp_path / (name + '.ran'))!r}, 'w').close()\n"
            "def rgb_to_hsv(*a):\n    return 'planted'\n"
            "def factory():\n    import colorsys\n    return colorsys.__file__\n")
    monkeypatch.chdir(tmp_path)
    for name in ("colorsys", "mymodels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


@pytest.mark.parametrize("cwd_first", [False, True], ids=["console script", "python -m (cwd first on sys.path)"])
def test_an_installed_module_is_never_shadowed_by_the_working_folder(planted, monkeypatch, cwd_first):
    from equivcheck.exploration.objects import load_object

    if cwd_first:
        monkeypatch.syspath_prepend(str(planted))
    path = list(sys.path)
    assert load_object("colorsys:rgb_to_hsv")(1, 0, 0) == (0.0, 1.0, 1)
    assert not (planted / "colorsys.ran").exists() and sys.path == path


def test_a_module_only_in_the_working_folder_is_found_behind_installed_ones_and_the_path_restored(planted):
    from equivcheck.exploration.objects import load_object

    path = list(sys.path)
    factory = load_object("mymodels:factory")
    assert (planted / "mymodels.ran").exists() and sys.path == path
    sys.modules.pop("colorsys", None)
    assert not factory().startswith(str(planted))  # what it imports later is the installed module
    assert not (planted / "colorsys.ran").exists()


def test_check_models_with_an_installed_factory_runs_no_planted_torch(tmp_path):
    import subprocess

    (tmp_path / "torch.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\nraise SystemExit(3)\n")
    code = ("import sys\nfrom equivcheck.exploration.objects import load_object\n"
            "f = load_object('equivcheck.modelcheck.examples:torch_vgg')\n"
            "import importlib.util\nprint(importlib.util.find_spec('torch').origin)\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "pwned").exists() and str(tmp_path) not in done.stdout, done.stdout


def test_each_readme_command_that_writes_a_report_writes_its_own_folder():
    """The README's command block wrote three commands' reports into one ``reports/``, each replacing the last."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = next(b.split("```", 1)[0] for b in text.split("```bash")[1:] if "--report" in b.split("```", 1)[0])
    lines = " ".join(block.replace("\\\n", " ").splitlines())
    folders = re.findall(r"--report\s+(\S+)", lines)
    demo = re.findall(r"equivcheck demo[^#]*", lines)
    assert len(folders) >= 2 and len(set(folders)) == len(folders), folders
    assert all("--report" in d for d in demo), demo  # demo's default folder is reports/: not shared with the others
    rebuilt = re.findall(r"equivcheck report (\S+)/equivcheck\.json", lines)
    assert rebuilt and all(f in folders for f in rebuilt), (rebuilt, folders)


@pytest.mark.parametrize("kind", ["the number 5", "a 400-digit exponent", "a FIFO", "a coarser accumulation for float32"])
def test_the_cli_ignores_a_bad_facts_cache_with_one_warning_line(tmp_path, kind):
    import subprocess

    env = {**os.environ, "EQUIVCHECK_FACTS_CACHE": str(tmp_path / "cache"),
           "EQUIVCHECK_FACTS_KEY": str(tmp_path / "key" / "facts.key")}
    argv = [sys.executable, "-m", "equivcheck", "verify", "--from", "caffe:dense", "--to", "caffe:conv", *SMALL_FLAGS, "--json"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    path = tmp_path / "cache" / "facts.json"
    if kind in FACT_ROW_EDITS:
        _edit_rows(path, FACT_ROW_EDITS[kind])
    else:
        _write_cache_file(path, kind)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    lines = again.stderr.splitlines()
    assert lines and all(line.startswith("equivcheck: warning: facts cache ") for line in lines), again.stderr
    assert len(lines) == (2 if kind in FACT_ROW_EDITS else 1), again.stderr  # one per edited row (source, target)

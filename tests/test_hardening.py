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
    result = pytester.runpytest("-p", "no:cacheprovider")
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
        return {(EVIL + k if keys else k): v if k in ("schema_version", "state", "columns") else _poison(v, keys)
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
        assert not [live for live in LIVE if live in text], name


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

"""Hostile weight files and outputs, catalogued: one line, exit 2, nothing written, nothing huge allocated.

Each case builds a small file that once fooled the loaders (HDF5 external storage, a zip bomb,
an expanded torch tensor...) and checks the refusal; a hypothesis fuzz feeds damaged versions
of valid files to the loaders.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equivcheck import files, memory
from equivcheck.cli import main
from equivcheck.errors import EquivcheckError

KERNEL = np.random.default_rng(0).standard_normal((60, 6)).astype(np.float32)
BIAS = np.linspace(-1, 1, 6, dtype=np.float32)
FLAGS = ["--from", "keras:dense", "--to", "torch:conv", "--channels", "3", "--spatial", "4,5", "--units", "6"]


def snapshot(folder: Path) -> dict[str, tuple]:
    return {p.name: (p.is_symlink(), os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.iterdir())}


def convert(capsys, src, out, *extra) -> tuple[int, str]:
    code = main(["convert", *FLAGS, str(src), str(out), *extra])
    return code, capsys.readouterr().err


def refused(capsys, tmp_path, src, match, *extra, out="out.npz") -> None:
    before = snapshot(tmp_path)
    code, err = convert(capsys, src, tmp_path / out, *extra)
    assert code == 2 and err.startswith("equivcheck: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    assert snapshot(tmp_path) == before


def npy_header(shape, descr="<f4") -> bytes:
    fh = io.BytesIO()
    np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
    return fh.getvalue()


@pytest.fixture()
def small_budget(monkeypatch):
    """Pretend the machine has 64 MiB, so the memory guard (half of it) stops anything past 32 MiB."""
    monkeypatch.setattr(memory, "physical_memory", lambda: 64 << 20)


# -- HDF5 --------------------------------------------------------------------------------------
def h5_file(tmp_path, build) -> Path:
    h5py = pytest.importorskip("h5py", reason="h5py reads HDF5")
    path = tmp_path / "hostile.h5"
    with h5py.File(path, "w") as f:
        build(f, h5py)
    return path


def external_storage(f, h5py):
    (Path(f.filename).parent / "secret.txt").write_bytes(b"s3cret!!" * 180)
    f.create_dataset("kernel", shape=(60, 6), dtype="f4", external=[("secret.txt", 0, 1440)])


def external_link(f, h5py):
    f["kernel"] = h5py.ExternalLink("/etc/passwd", "/kernel")


def virtual(f, h5py):
    layout = h5py.VirtualLayout(shape=(60, 6), dtype="f4")
    layout[:] = h5py.VirtualSource("other.h5", "kernel", shape=(60, 6))
    f.create_virtual_dataset("kernel", layout)


def huge_kernel(f, h5py):
    f.create_dataset("kernel", shape=(1 << 20, 1 << 20), dtype="f4", chunks=(256, 256))


def compound(f, h5py):
    f["kernel"] = np.zeros((60, 6), [("re", "f4"), ("im", "f4")])


@pytest.mark.parametrize("build, match", [
    (external_storage, "keeps its data in an external file: refused"),
    (external_link, r"links 'kernel' to another file \('/etc/passwd'\): external links refused"),
    (virtual, "is virtual"),
    (huge_kernel, r"kernel shape=\(1048576, 1048576\)"),
    (compound, "dtype=.*is not a real numeric type"),
])
def test_hostile_h5_is_refused(tmp_path, capsys, build, match):
    refused(capsys, tmp_path, h5_file(tmp_path, build), match, "--kernel-key", "kernel")


def test_h5_reads_only_the_arrays_needed(tmp_path, capsys, small_budget):
    def with_junk(f, h5py):
        f["kernel"], f["bias"] = KERNEL, BIAS
        f.create_dataset("junk", shape=(1 << 15, 1 << 15), dtype="f4", compression="gzip", chunks=(1024, 1024))  # 4 GiB declared

    src = h5_file(tmp_path, with_junk)
    assert src.stat().st_size < 20_000
    code, err = convert(capsys, src, tmp_path / "out.npz")
    assert code == 0, err
    with pytest.raises(EquivcheckError, match=r"needs about 4\.0 GiB") as info:
        files.load_arrays(src)  # all of them: the guard stops it before reading
    assert "\n" not in str(info.value)


# -- .npz / .npy ---------------------------------------------------------------------------------
def test_zip_bomb_npz_is_stopped_before_inflating(tmp_path, small_budget):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("kernel.npy", "w", force_zip64=True) as fh:
        fh.write(npy_header((1 << 13, 1 << 12)))
        for _ in range(1 << 7):
            fh.write(bytes(1 << 20))  # 128 MiB of zeros deflate to about 128 KB
    assert path.stat().st_size < 1 << 20
    with pytest.raises(EquivcheckError, match=r"reading .* needs about 0\.1 GiB, more than half") as info:
        files.load_arrays(path)
    assert "\n" not in str(info.value)


def forged_npz(tmp_path, name, payload) -> Path:
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, payload)
    return path


@pytest.mark.parametrize("name, payload, match", [
    ("kernel.npy", npy_header((1 << 20, 1 << 20)) + bytes(1000), "declares 4398046511104 bytes of data but holds 1000"),
    ("kernel.npy", b"kernel,bias\n1,2\n" * 10, r"'kernel' in .* is not a .npy array \(no \\x93NUMPY magic\)"),
    ("kernel.npy", npy_header((60, 6), "|O") + pickle.dumps([1]), "pickled code refused"),
    ("kernel.npy", npy_header((60, 6), "<c8") + bytes(60 * 6 * 8), "dtype=complex64 is not a real numeric type"),
    ("kernel.npy", npy_header((60, 6), "|V4") + bytes(60 * 6 * 4), r"dtype=\|V4 is not a real numeric type"),
], ids=["re-declared", "no magic", "objects", "complex", "void"])
def test_forged_npz_members_are_refused(tmp_path, capsys, name, payload, match):
    refused(capsys, tmp_path, forged_npz(tmp_path, name, payload), match)


def test_corrupt_deflate_stream_in_npz_is_one_line(tmp_path, capsys):
    src = tmp_path / "w.npz"
    np.savez_compressed(src, kernel=KERNEL, bias=BIAS)
    data = bytearray(src.read_bytes())
    data[80] ^= 0x20  # inside kernel.npy's deflate stream: zlib fails while inflating (was a zlib.error traceback)
    src.write_bytes(bytes(data))
    refused(capsys, tmp_path, src, r"is not a readable weight file: truncated or corrupt \(error: Error -3 while decompressing")


def test_raw_pickle_says_pickled_code_refused(tmp_path, capsys):
    src = tmp_path / "w.npz"
    src.write_bytes(pickle.dumps({"kernel": KERNEL}))
    refused(capsys, tmp_path, src, "could run code when loaded: pickled code refused")


# -- .safetensors -----------------------------------------------------------------------------------
def safetensors_file(tmp_path, header: dict, data: bytes) -> Path:
    import json

    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("header, data, match", [
    ({"kernel": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, bytes(1440), "expected 4398046511104 bytes within the 1440"),
    ({"kernel": {"dtype": "F32", "shape": [60, 6], "data_offsets": [0, 1440]}}, bytes(100), "within the 100 the file holds"),
    ({"kernel": {"dtype": "C64", "shape": [60, 6], "data_offsets": [0, 2880]}}, bytes(2880), "dtype=C64 is not read"),
    ({"kernel": {"dtype": "F32", "shape": "60x6", "data_offsets": [0, 1440]}}, bytes(1440), "malformed entry"),
], ids=["huge", "short", "complex", "malformed"])
def test_forged_safetensors_are_refused(tmp_path, capsys, header, data, match):
    refused(capsys, tmp_path, safetensors_file(tmp_path, header, data), match)


# -- torch -------------------------------------------------------------------------------------------
@pytest.fixture()
def torch():
    return pytest.importorskip("torch", reason="torch files")


def test_expanded_tensor_is_checked_before_it_is_materialised(tmp_path, torch):
    path = tmp_path / "expanded.pt"
    torch.save({"weight": torch.zeros(1).expand(1 << 17, 1 << 17)}, path)  # 64 GiB of one stored float
    assert path.stat().st_size < 4096
    with pytest.raises(EquivcheckError, match=r"reading .* needs about 64\.0 GiB") as info:
        files.load_arrays(path)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("kind, match", [
    ("float8", "dtype=float8_e4m3fn is not read by equivcheck"),
    ("meta", "a meta .* tensor .* is not a plain array"),
    ("quantized", "a quantized tensor"),
    ("sparse", "a sparse_coo tensor"),
    ("pickled code", "could run code when loaded: pickled code refused"),
])
def test_torch_files_without_plain_tensors_are_refused(tmp_path, capsys, torch, kind, match):
    k = torch.from_numpy(KERNEL)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    weight = {"float8": lambda: k.to(torch.float8_e4m3fn), "meta": lambda: k.to("meta"), "sparse": k.to_sparse,
              "quantized": lambda: torch.quantize_per_tensor(k, 0.1, 0, torch.qint8), "pickled code": Payload}[kind]()
    torch.save({"weight": weight}, tmp_path / "w.pt")
    refused(capsys, tmp_path, tmp_path / "w.pt", match, "--kernel-key", "weight")


def test_bfloat16_pt_converts_to_pt_and_safetensors_but_not_npz(tmp_path, capsys, torch):
    src = tmp_path / "bf16.pt"
    torch.save({"weight": torch.from_numpy(KERNEL).bfloat16(), "bias": torch.from_numpy(BIAS).bfloat16()}, src)
    refused(capsys, tmp_path, src, r"kernel dtype=bfloat16 cannot be written to .npz \(numpy would record it as void \|V2")
    for out in ("out.pt", "out.safetensors"):
        code, err = convert(capsys, src, tmp_path / out)
        back = files.load_arrays(tmp_path / out)
        assert code == 0 and back["kernel"].dtype.name == back["bias"].dtype.name == "bfloat16", err
        assert np.array_equal(back["bias"].astype(np.float32), torch.from_numpy(BIAS).bfloat16().float().numpy())


def test_bfloat16_safetensors_converts_to_safetensors_and_pt(tmp_path, capsys, torch):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors writes the source")
    src = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file({"kernel": torch.from_numpy(KERNEL).bfloat16(), "bias": torch.from_numpy(BIAS).bfloat16()}, src)
    assert files.load_arrays(src)["kernel"].dtype.name == "bfloat16"
    for out in ("out.safetensors", "out.pt"):
        code, err = convert(capsys, src, tmp_path / out)
        back = files.load_arrays(tmp_path / out)
        assert code == 0 and back["kernel"].dtype.name == "bfloat16", err
        want = torch.from_numpy(KERNEL).bfloat16().float().numpy().reshape(4, 5, 3, 6).transpose(3, 2, 0, 1)
        assert np.array_equal(back["kernel"].astype(np.float32), want)


def test_npz_of_4_mb_inflating_to_4_gib_is_stopped_before_inflating(tmp_path, small_budget):
    """A hand-made deflate stream: 4096 copies of one flushed block of 1 MiB of zeros after the .npy header."""
    import time
    import zlib

    header = npy_header((1 << 15, 1 << 15))  # float32: 4 GiB
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)  # self-contained after a full flush
    stream = head + block * 4096 + packer.flush()
    info = zipfile.ZipInfo("kernel.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as z, z.open(info, "w", force_zip64=True) as fh:
        fh._compressor = type("Raw", (), {"compress": lambda self, data: b"", "flush": lambda self: stream})()
        fh.write(header)
        fh._file_size = len(header) + (1 << 32)  # what the zip declares: the header and 4 GiB of data
    assert path.stat().st_size < 5 << 20
    with zipfile.ZipFile(path) as z, z.open("kernel.npy") as member:
        assert z.getinfo("kernel.npy").file_size == len(header) + (1 << 32)
        assert member.read(len(header)) == header and member.read(3 << 20) == bytes(3 << 20)  # a real bomb: it inflates
    start = time.perf_counter()
    with pytest.raises(EquivcheckError, match=r"reading .* needs about 4\.0 GiB") as info_:
        files.load_arrays(path)
    assert "\n" not in str(info_.value) and time.perf_counter() - start < 2  # not inflated: 4 GiB takes far longer


# -- ONNX --------------------------------------------------------------------------------------------
def onnx_hostile(tmp_path, kind: str) -> Path:
    pytest.importorskip("onnx", reason="onnx writes .onnx files")
    from onnx import helper, numpy_helper

    from tests.test_files_runtimes import onnx_file

    path = tmp_path / "m.onnx"
    flat, gemm = helper.make_node("Flatten", ["x"], ["f"], name="flat"), helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc")
    if kind in ("random bytes", "truncated"):
        data = np.random.default_rng(3).bytes(300) if kind == "random bytes" else onnx_file(path).read_bytes()[:-700]
        path.write_bytes(data)
        return path
    if kind == "cycle":
        return onnx_file(path, [helper.make_node("Relu", ["y"], ["r"], name="loop"), helper.make_node("Add", ["x", "r"], ["f"], name="add"),
                                helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc")])
    if kind == "unknown op":
        return onnx_file(path, [flat, helper.make_node("RunShell", ["f"], ["g"], name="evil"), gemm])
    if kind == "undeclared domain":
        return onnx_file(path, [flat, helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc", domain="com.evil")])
    if kind == "huge dims":
        t = numpy_helper.from_array(KERNEL, "W")
        t.dims[:] = [1 << 20, 1 << 20]
        return onnx_file(path, initializers=[t, numpy_helper.from_array(BIAS, "b")])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, match", [
    ("random bytes", r"is not an ONNX model: truncated or corrupt \(protobuf DecodeError\)"),
    ("truncated", r"is not an ONNX model: truncated or corrupt"),
    ("cycle", r"has a cycle in its graph \(node '.*' depends on its own output\)"),
    ("unknown op", r"node 'evil' has op_type='RunShell', which is not an ONNX operator: refused"),
    ("undeclared domain", r"node 'fc' uses domain='com.evil', which the model does not import"),
    ("huge dims", r"initializer 'W' .* declares shape=\(1048576, 1048576\) .* \(4398046511104 bytes\) but holds 1440"),
])
def test_hostile_onnx_is_refused(tmp_path, capsys, kind, match):
    refused(capsys, tmp_path, onnx_hostile(tmp_path, kind), match, "--from", "onnx:dense")


def test_onnx_with_many_linear_nodes_is_indexed_in_linear_time(tmp_path, capsys):
    """10 000 MatMul nodes, each with its Add: finding each one's bias must not scan the graph again (was quadratic)."""
    import time

    pytest.importorskip("onnx", reason="onnx")
    from onnx import helper, numpy_helper

    from tests.test_files_runtimes import onnx_file

    n = 10_000
    nodes = [helper.make_node("Flatten", ["x"], ["h0"], name="flat")]
    for i in range(n):
        nodes += [helper.make_node("MatMul", [f"h{i}", "W"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", "b"], [f"h{i + 1}"])]
    nodes[-1].output[0] = "y"
    src = onnx_file(tmp_path / "m.onnx", nodes, [numpy_helper.from_array(KERNEL, "W"), numpy_helper.from_array(BIAS, "b")])
    start = time.perf_counter()
    code, err = convert(capsys, src, tmp_path / "out.npz")  # one weight, shared: it is the kernel
    assert code == 0 and time.perf_counter() - start < 10, err
    assert np.array_equal(files.load_arrays(tmp_path / "out.npz")["bias"], BIAS)


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """Every path opened with open() while the test runs."""
    import builtins

    seen: list[str] = []
    real = builtins.open

    def spy(file, *args, **kwargs):
        seen.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


@pytest.mark.parametrize("location, match", [
    ("/etc/passwd", "expected a relative file name inside the model's folder"),
    ("../secret.bin", "expected a relative file name inside the model's folder"),
    ("link.bin", "which resolves outside the model's folder: refused"),
    ("missing.bin", "which does not exist or is not a file"),
    ("sub", "which does not exist or is not a file"),
    ("inside.bin?len", r"declared shape=\(60, 6\) dtype=float32 needs 1440 bytes, the entry says 4398046511104"),
])
def test_onnx_external_data_outside_the_folder_is_never_opened(tmp_path, capsys, opened, location, match):
    import equivcheck.model_weights  # noqa: F401  (imported before the spy counts opens)
    from tests.test_files_runtimes import external, onnx_file

    pytest.importorskip("onnx", reason="onnx")
    from onnx import numpy_helper

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.bin").write_bytes(KERNEL.tobytes())
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    (folder / "inside.bin").write_bytes(KERNEL.tobytes())
    weight = external("W", KERNEL, location.removesuffix("?len"), length=(1 << 42) if location.endswith("?len") else None)
    src = onnx_file(folder / "m.onnx", initializers=[weight, numpy_helper.from_array(BIAS, "b")])
    before = snapshot(folder)
    opened.clear()
    code, err = convert(capsys, src, folder / "out.npz", "--from", "onnx:dense")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and re.search(match, err), err
    assert snapshot(folder) == before
    assert str((folder / "m.onnx").resolve()) in opened  # the spy sees the reader's opens
    assert not [p for p in opened if not p.startswith(str(folder.resolve()))], opened  # neither secret.bin nor /etc/passwd


def test_onnx_external_data_is_checked_against_the_guard_before_reading(tmp_path, capsys, small_budget):
    from tests.test_files_runtimes import external, onnx_file

    pytest.importorskip("onnx", reason="onnx")
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (4096, 4096), (0, 0))  # 64 MiB declared
    with open(tmp_path / "big.bin", "wb") as fh:
        fh.truncate(big.nbytes)  # a sparse file: nothing on disk
    src = onnx_file(tmp_path / "m.onnx", initializers=[external("W", big, "big.bin")])
    with pytest.raises(EquivcheckError, match=r"needs about 0\.1 GiB, more than half") as info:
        files.load_arrays(src)
    assert "\n" not in str(info.value)


# -- TFLite ------------------------------------------------------------------------------------------
def tflite_hostile(tmp_path, kind: str) -> Path:
    from tests.test_files_runtimes import tflite_bytes

    fc = [("x", [1, 60], 0, 0), ("W", [6, 60], 0, 1), ("b", [6], 0, 2), ("y", [1, 6], 0, 0)]
    buffers = [b"", KERNEL.tobytes(), BIAS.tobytes()]
    data = {
        "random bytes": lambda: np.random.default_rng(4).bytes(400),
        "truncated": lambda: tflite_bytes()[:300],
        "cycle": lambda: tflite_bytes([*fc, ("r", [1, 6], 0, 0)], [(0, [0, 1, 2], [3]), (1, [3], [0])], (9, 19), buffers),
        "unknown op": lambda: tflite_bytes(fc, [(0, [0, 1, 2], [3])], (999,), buffers),
        "opcode index": lambda: tflite_bytes(fc, [(5, [0, 1, 2], [3])], (9,), buffers),
        "huge dims": lambda: tflite_bytes([fc[0], ("W", [60000, 60000], 0, 1), *fc[2:]], [(0, [0, 1, 2], [3])], (9,), buffers),
        "buffer past the end": lambda: tflite_bytes(fc, [(0, [0, 1, 2], [3])], (9,), [b"", b"", BIAS.tobytes()],
                                                    buffer_at=(1, 1 << 40, 1440)),
        "external buffer": lambda: tflite_bytes(fc, [(0, [0, 1, 2], [3])], (9,), buffers, external_buffer=1),
    }[kind]()
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, match", [
    ("random bytes", r"is not a TFLite model \(no TFL3 identifier at byte 4\)"),
    ("truncated", r"is not a readable weight file: truncated or corrupt \(IndexError: flatbuffer"),
    ("cycle", r"has a cycle in its graph"),
    ("unknown op", r"uses builtin operator code=999, which is not a TFLite operator: refused"),
    ("opcode index", r"has an operator with opcode_index=5: the model lists 1"),
    ("huge dims", r"tensor 'W' .* declares shape=\(60000, 60000\) .* \(14400000000 bytes\) but its buffer holds 1440"),
    ("buffer past the end", r"buffer 1 of tensor 'W' .* lies at bytes 1099511627776\.\.1099511629216: past the file's"),
    ("external buffer", r"tensor 'W' .* keeps its data in an external buffer: refused"),
])
def test_hostile_tflite_is_refused(tmp_path, capsys, kind, match):
    refused(capsys, tmp_path, tflite_hostile(tmp_path, kind), match, "--from", "tflite:dense")


# -- .keras --------------------------------------------------------------------------------------------
def keras_archive(tmp_path, build, name="model.weights.h5", declared: int | None = None) -> Path:
    """A .keras zip whose weights file ``build`` fills (h5py); ``declared`` forges the member's inflated size."""
    h5 = h5_file(tmp_path, build)
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", '{"class_name": "Sequential"}')
        z.write(h5, name)
        size = struct.pack("<I", z.getinfo(name).file_size)
    h5.unlink()
    if declared is not None:  # the local header and the central directory both carry the inflated size
        data = path.read_bytes()
        assert data.count(size) == 2
        path.write_bytes(data.replace(size, struct.pack("<I", declared)))
    return path


def keras_dense(f, h5py):
    f["layers/dense/vars/0"], f["layers/dense/vars/1"] = KERNEL, BIAS


@pytest.mark.parametrize("kind, match", [
    ("external link", r"links 'layers/dense/vars/0' to another file \('/etc/passwd'\): external links refused"),
    ("external storage", "keeps its data in an external file: refused"),
    ("no weights", r"holds no model\.weights\.h5: expected a \.keras file saved by Keras 3"),
    ("inflates past the guard", r"reading .*m\.keras' needs about 3\.9 GiB"),
])
def test_hostile_keras_archive_is_refused(tmp_path, capsys, small_budget, kind, match):
    def link(f, h5py):
        f["layers/dense/vars/0"] = h5py.ExternalLink("/etc/passwd", "/kernel")

    def storage(f, h5py):
        external_storage(f, h5py)
        f["layers/dense/vars/0"] = f["kernel"]

    build = {"external link": link, "external storage": storage}.get(kind, keras_dense)
    src = keras_archive(tmp_path, build, name="weights.bin" if kind == "no weights" else "model.weights.h5",
                        declared=0xFA000000 if kind == "inflates past the guard" else None)
    refused(capsys, tmp_path, src, match, "--from", "keras:dense")


@pytest.mark.parametrize("kind, match", [
    ("a config declaring a huge Dense", r"loading .*bomb\.keras' needs about 7450\.7 GiB, more than half"),
    ("a config that is not JSON", r"has a config\.json that is not JSON"),
    ("no config", r"holds no config\.json"),
    ("not a zip", r"is not a readable \.keras model"),
])
def test_a_hostile_keras_model_is_refused_before_keras_builds_it(tmp_path, capsys, kind, match):
    """The model commands hand a .keras file to Keras: what building it allocates is checked first."""
    from equivcheck.cli import main

    src = tmp_path / "bomb.keras"
    dense = {"class_name": "Dense", "config": {"units": 10_000_000}, "build_config": {"input_shape": [None, 100_000]}}
    config = {"class_name": "Sequential", "config": {"layers": [dense]}}
    if kind == "not a zip":
        src.write_bytes(b"PK\x03\x04 not really")
    else:
        with zipfile.ZipFile(src, "w") as z:
            if kind != "no config":
                z.writestr("config.json", "{not json" if kind == "a config that is not JSON" else json.dumps(config))
            z.writestr("metadata.json", "{}")
    before = snapshot(tmp_path)
    code = main(["convolutionalize", str(src), str(tmp_path / "out.keras")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    assert snapshot(tmp_path) == before


# -- outputs ------------------------------------------------------------------------------------------
@pytest.fixture()
def weights(tmp_path) -> Path:
    path = tmp_path / "dense.npz"
    np.savez(path, kernel=KERNEL, bias=BIAS)
    return path


@pytest.mark.parametrize("make, match, force", [
    (lambda p: p.symlink_to("nowhere.npz"), "already exists: pass --force", False),
    (lambda p: p.symlink_to(p.name), "cannot be written: Too many levels of symbolic links", True),
    (lambda p: p.mkdir(), "is a directory: expected a file name", True),
    (lambda p: None, "output name of 300 bytes is too long", False),
])
def test_bad_output_paths_get_one_line(tmp_path, capsys, weights, make, match, force):
    out = tmp_path / ("a" * 296 + ".npz" if "too long" in match else "out.npz")
    if "too long" not in match:
        make(out)
    refused(capsys, tmp_path, weights, match, *(["--force"] if force else []), out=out.name)


def test_outputs_follow_the_umask(tmp_path, capsys, weights):
    old = os.umask(0o027)
    try:
        code, _ = convert(capsys, weights, tmp_path / "out.npz")
    finally:
        os.umask(old)
    assert code == 0 and stat.S_IMODE((tmp_path / "out.npz").stat().st_mode) == 0o640


def test_two_racing_writers_one_wins(tmp_path, weights):
    """Both pass the existence check before either publishes: the hard link lets exactly one win."""
    code = ("import sys, time, numpy as np; from equivcheck import cli\n"
            "real = np.savez\n"
            "def slow(*a, **k):\n    real(*a, **k)\n    time.sleep(1.5)\n"
            "np.savez = slow\nsys.exit(cli.main(sys.argv[1:]))\n")
    argv = [sys.executable, "-c", code, "convert", *FLAGS, str(weights), str(tmp_path / "out.npz")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=60), p.stdout.read() + p.stderr.read()) for p in procs)
    assert [r[0] for r in results] == [0, 2], results
    assert "wrote" in results[0][1] and "another writer made it meanwhile" in results[1][1], results
    assert results[1][1].count("\n") == 1 and "Traceback" not in results[1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.npz", "out.npz"]
    assert np.array_equal(files.load_arrays(tmp_path / "out.npz")["bias"], BIAS)


def onnx_outside(tmp_path) -> Path:
    pytest.importorskip("onnx", reason="onnx")
    from tests.test_files_runtimes import external, onnx_file

    return onnx_file(tmp_path / "m.onnx", initializers=[external("kernel", KERNEL, "/etc/passwd")])


@pytest.mark.parametrize("name, build", [
    ("external storage", lambda tmp: h5_file(tmp, external_storage)),
    ("zip bomb", lambda tmp: forged_npz(tmp, "kernel.npy", npy_header((1 << 20, 1 << 20)) + bytes(64))),
    ("onnx data outside", lambda tmp: onnx_outside(tmp)),
    ("tflite truncated", lambda tmp: tflite_hostile(tmp, "truncated")),
])
def test_cli_subprocess_refuses_hostile_files(tmp_path, name, build):
    src = build(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "equivcheck", "convert", *FLAGS, str(src), str(tmp_path / "out.npz"),
                           "--kernel-key", "kernel"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert snapshot(tmp_path) == before


# -- fuzz -------------------------------------------------------------------------------------------
def valid_file(kind: str, folder: Path) -> Path:
    """A small valid weight file of ``kind``."""
    path = folder / f"w.{kind}"
    if kind == "h5":
        h5py = pytest.importorskip("h5py", reason="h5py")
        with h5py.File(path, "w") as f:
            f["kernel"], f["bias"] = KERNEL, BIAS
    elif kind == "pt":
        torch = pytest.importorskip("torch", reason="torch")
        torch.save({"weight": torch.from_numpy(KERNEL), "bias": torch.from_numpy(BIAS)}, path)
    elif kind == "keras":
        keras_archive(folder, keras_dense).rename(path)
    elif kind == "onnx":
        from onnx import numpy_helper

        from tests.test_files_runtimes import onnx_file

        onnx_file(path, initializers=[numpy_helper.from_array(KERNEL, "W"), numpy_helper.from_array(BIAS, "b")])
    elif kind == "tflite":
        from tests.test_files_runtimes import tflite_bytes

        path.write_bytes(tflite_bytes(*tflite_parts(60)))
    else:
        files.save_arrays(path, {"kernel": KERNEL, "bias": BIAS})
    return path


def tflite_parts(rows: int) -> tuple:
    """A FULLY_CONNECTED model's tensors, ops, codes and buffers, its weight declared with ``rows`` rows."""
    tensors = [("x", [1, 6], 0, 0), ("W", [rows, 6], 0, 1), ("b", [6], 0, 2), ("y", [1, 6], 0, 0)]
    return tensors, [(0, [0, 1, 2], [3])], (9,), [b"", KERNEL.tobytes(), BIAS.tobytes()]


def redeclared(path: Path, kind: str) -> bytes:
    """``path`` rebuilt whole (valid container, checksums) but declaring its kernel far larger than the data it holds."""
    data = path.read_bytes()
    if kind == "h5":  # the dataspace's dims, same length in place
        return data.replace(struct.pack("<QQ", 60, 6), struct.pack("<QQ", 1 << 40, 6))
    if kind == "onnx":
        import onnx

        model = onnx.load_from_string(data)
        model.graph.initializer[0].dims[:] = [60000, 60000]
        return model.SerializeToString()
    if kind == "tflite":
        from tests.test_files_runtimes import tflite_bytes

        return tflite_bytes(*tflite_parts(1 << 28))
    if kind == "keras":  # its weights file re-declared as above, zipped again
        with tempfile.TemporaryDirectory() as folder:
            weights = redeclared(h5_file(Path(folder), keras_dense), "h5")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("config.json", "{}")
            z.writestr("model.weights.h5", weights)
        return out.getvalue()
    if kind == "safetensors":
        n = struct.unpack("<Q", data[:8])[0]
        header = data[8 : 8 + n].replace(b"[60,6]", b"[60000000,60000000]")
        return struct.pack("<Q", len(header)) + header + data[8 + n :]
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            member = old.read(info)
            if info.filename == "kernel.npy":
                member = npy_header((60000, 60000)) + member[len(npy_header((60, 6))) :]
            elif info.filename.endswith("data.pkl"):
                member = member.replace(b"K<K\x06", b"M\x00\x01K\x06")  # torch.Size((65536, 6))
            new.writestr(info.filename, member)
    return out.getvalue()


def damage(path: Path, kind: str, how: str, where: float, bit: int) -> bytes:
    if how == "redeclare":
        return redeclared(path, kind)
    data = path.read_bytes()
    i = min(int(where * len(data)), len(data) - 1)
    if how == "truncate":
        return data[:i]
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]


@settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])  # examples: the profile's
@given(st.sampled_from(["npz", "safetensors", "h5", "pt", "keras", "onnx", "tflite"]),
       st.sampled_from(["truncate", "flip", "flip", "redeclare"]),
       st.floats(0, 1), st.integers(0, 7))
def test_damaged_files_give_an_equivcheck_error_or_arrays(kind, how, where, bit):
    """load_arrays gives arrays within the guard or one line; convert exits 0 or 2 with one line and no stray file."""
    with tempfile.TemporaryDirectory() as folder:
        path = valid_file(kind, Path(folder))
        path.write_bytes(damage(path, kind, how, where, bit))
        saved = memory.physical_memory
        memory.physical_memory = lambda: 64 << 20  # a 32 MiB guard: a huge re-declared array must not get through
        try:
            try:
                arrays = files.load_arrays(path)
            except EquivcheckError as exc:
                assert "\n" not in str(exc)
            else:
                assert all(isinstance(a, np.ndarray) and a.nbytes <= 32 << 20 for a in arrays.values())
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(["convert", *FLAGS, str(path), str(Path(folder) / "out.npz")])
        finally:
            memory.physical_memory = saved
        assert (code, err.getvalue().count("\n")) in ((0, 0), (2, 1)) and "Traceback" not in err.getvalue(), err.getvalue()
        assert sorted(p.name for p in Path(folder).iterdir()) == sorted([path.name, *(["out.npz"] if code == 0 else [])])


# -- round 3: decoding guards, non-regular files, readers' own warnings ----------------------------
def tflite_shared(kind: str, n: int = 4000) -> bytes:
    """A small TFLite model whose ``n`` tensors share one long name, one long shape, or whose operators share one
    long input list: each shared reference decodes again (about 4 GB in all, from a file under 1 MB, before the guard)."""
    flatbuffers = pytest.importorskip("flatbuffers", reason="flatbuffers builds .tflite files")
    s = pytest.importorskip("ai_edge_litert.schema_py_generated", reason="ai-edge-litert carries the TFLite schema")
    b = flatbuffers.Builder(1 << 20)

    def ints(start, values):
        start(b, len(values))
        for v in reversed(values):
            b.PrependInt32(v)
        return b.EndVector()

    def tables(start, offsets):
        start(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    s.BufferStart(b)
    empty = s.BufferEnd(b)
    four = b.CreateNumpyVector(np.zeros(4, np.uint8))
    s.BufferStart(b)
    s.BufferAddData(b, four)
    stored = s.BufferEnd(b)  # a float32 scalar's bytes: a tensor naming it is a constant, whose shape is read
    name = b.CreateString("n" * (1 << 20) if kind == "one long name" else "x")
    shape = ints(s.TensorStartShapeVector, [1] * (1 << 16) if kind == "one long shape" else [1, 6])
    made = []
    for _ in range(n if kind != "one long input list" else 2):
        s.TensorStart(b)
        s.TensorAddShape(b, shape)
        s.TensorAddBuffer(b, 1 if kind == "one long shape" else 0)
        s.TensorAddName(b, name)
        made.append(s.TensorEnd(b))
    ops = []
    if kind == "one long input list":
        inputs = ints(s.OperatorStartInputsVector, [0] * (1 << 16))
        outputs = ints(s.OperatorStartOutputsVector, [1])
        for _ in range(n):
            s.OperatorStart(b)
            s.OperatorAddInputs(b, inputs)
            s.OperatorAddOutputs(b, outputs)
            ops.append(s.OperatorEnd(b))
    t_vec, op_vec = tables(s.SubGraphStartTensorsVector, made), tables(s.SubGraphStartOperatorsVector, ops)
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, t_vec)
    s.SubGraphAddOperators(b, op_vec)
    graph = s.SubGraphEnd(b)
    s.OperatorCodeStart(b)
    s.OperatorCodeAddBuiltinCode(b, 0)
    code = s.OperatorCodeEnd(b)
    codes, graphs = tables(s.ModelStartOperatorCodesVector, [code]), tables(s.ModelStartSubgraphsVector, [graph])
    buffers = tables(s.ModelStartBuffersVector, [empty, stored])
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddOperatorCodes(b, codes)
    s.ModelAddSubgraphs(b, graphs)
    s.ModelAddBuffers(b, buffers)
    b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


SHARED = ["one long name", "one long shape", "one long input list"]


@pytest.mark.parametrize("kind", SHARED)
def test_tflite_shared_references_are_counted_as_decoded(tmp_path, capsys, kind):
    import time

    src = tmp_path / "m.tflite"
    src.write_bytes(tflite_shared(kind))
    assert src.stat().st_size < 2 << 20
    start = time.perf_counter()
    refused(capsys, tmp_path, src, r"decodes more than \d+ bytes of names and tables from a \d+-byte file", "--from", "tflite:dense")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", SHARED)
def test_explore_refuses_a_tflite_decode_bomb_before_the_interpreter(tmp_path, kind):
    from equivcheck.exploration.runtimes import runtime_side
    from equivcheck.specs import Shape

    data = tflite_shared(kind)
    (tmp_path / "m.tflite").write_bytes(data)
    for source in (data, str(tmp_path / "m.tflite")):
        with pytest.raises(EquivcheckError, match="decodes more than") as info:
            runtime_side(source, Shape(channels=6))
        assert "\n" not in str(info.value)


def test_a_tflite_of_many_plain_tensors_is_within_the_decode_budget(tmp_path):
    from equivcheck import model_weights as runtimes

    data = tflite_shared("a plain model", n=200)
    index = runtimes._tflite(runtimes._Flat(data, "m"), "m")
    assert index == {} and len(data) < 20_000  # names and shapes read once each: no refusal


def non_regular(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "a device":
        path.symlink_to("/dev/zero")
    return path


NON_REGULAR_COMMANDS = {
    "convert .npz": lambda p: ["convert", *FLAGS, str(p), str(p.parent / "out.npz")],
    "convert .tflite": lambda p: ["convert", *FLAGS, "--from", "tflite:dense", str(p), str(p.parent / "out.npz")],
    "convert .onnx": lambda p: ["convert", *FLAGS, "--from", "onnx:dense", str(p), str(p.parent / "out.npz")],
    "explore .tflite": lambda p: ["explore", "--source", str(p), "--to", "keras:dense", "--channels", "3"],
    "explore .onnx:NODE": lambda p: ["explore", "--source", f"{p}:fc", "--to", "torch:dense", "--channels", "3"],
    "report": lambda p: ["report", str(p)],
    "convolutionalize .keras": lambda p: ["convolutionalize", str(p), str(p.parent / "out.keras")],
    "check-models .pt": lambda p: ["check-models", str(p), str(p), "--model", "equivcheck.modelcheck.examples:torch_vgg"],
}
SUFFIX = {"convert .npz": ".npz", "convert .tflite": ".tflite", "convert .onnx": ".onnx", "explore .tflite": ".tflite",
          "explore .onnx:NODE": ".onnx", "report": ".json", "convolutionalize .keras": ".keras", "check-models .pt": ".pt"}


@pytest.mark.parametrize("kind", ["a FIFO", "a folder", "a device"])
@pytest.mark.parametrize("command", NON_REGULAR_COMMANDS)
def test_every_command_refuses_a_non_regular_file_without_waiting(tmp_path, command, kind):
    """A FIFO as input hung explore (open() waits for a writer); each command now refuses it in one line."""
    path = non_regular(tmp_path, kind, "m" + SUFFIX[command])
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "equivcheck", *NON_REGULAR_COMMANDS[command](path)],
                          capture_output=True, text=True, timeout=180)  # a hang would hit this; a busy machine does not
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("protocol", [2, 4])
def test_reading_a_pt_file_shows_none_of_torchs_own_warnings(tmp_path, protocol):
    """Protocol 4 made torch warn ("Detected pickle protocol 4 ...") around equivcheck's own line."""
    pytest.importorskip("torch", reason="torch files")
    src, out = str(tmp_path / "w.pt"), str(tmp_path / "out.npz")
    code = ("import sys, torch\n"
            f"torch.save({{'weight': torch.zeros(60, 6), 'bias': torch.zeros(6)}}, {src!r}, pickle_protocol={protocol})\n"
            "from equivcheck.cli import main\n"
            f"sys.exit(main(['convert', *{FLAGS!r}, '--kernel-key', 'weight', {src!r}, {out!r}]))\n")
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    if protocol == 2:
        assert done.returncode == 0 and done.stderr == "", done.stderr
    else:  # torch's safe loader refuses it: equivcheck's one line, and nothing of torch's
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Detected pickle protocol" not in done.stderr, done.stderr


def onnx_external_model(tmp_path: Path, shape: tuple[int, ...], data_size: int, *, length: bool, kind: str = "file") -> Path:
    """A Flatten + Gemm model whose weight W (``shape``, float32) lives in ``w.bin`` (``data_size`` bytes, sparse)."""
    pytest.importorskip("onnx", reason="onnx")
    from onnx import numpy_helper

    from tests.test_files_runtimes import external, onnx_file

    if kind == "a FIFO":
        os.mkfifo(tmp_path / "w.bin")
    else:
        with open(tmp_path / "w.bin", "wb") as fh:
            fh.truncate(data_size)
    t = external("W", np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape)), "w.bin")
    if not length:
        kept = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        for key, value in kept:
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return onnx_file(tmp_path / "m.onnx", initializers=[t, numpy_helper.from_array(BIAS, "b")])


@pytest.fixture()
def onnx_load_spy(monkeypatch) -> list:
    onnx = pytest.importorskip("onnx", reason="onnx")
    calls: list = []
    real = onnx.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("load_external_data", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx, "load", spy)
    return calls


@pytest.mark.parametrize("case, match", [
    ("declared 64 MiB, no length", r"loading .*m\.onnx' needs about 0\.1 GiB, more than half"),
    ("declared 64 MiB, with its length", r"loading .*m\.onnx' needs about 0\.1 GiB, more than half"),
    ("declared 1440 bytes, no length, 5 GiB of data", r"needs 1440 bytes, the entry says 5368709120"),
    ("data in a FIFO", r"which does not exist or is not a file"),
])
def test_explore_guards_onnx_external_data_before_onnx_reads_it(tmp_path, small_budget, onnx_load_spy, case, match):
    from equivcheck.exploration.runtimes import runtime_side
    from equivcheck.specs import Shape

    big = case.startswith("declared 64 MiB")
    shape = (6, 1 << 22) if big else (6, 60)
    src = onnx_external_model(tmp_path, shape, (1 << 24) * 6 if big else 5 << 30, length="with its length" in case,
                              kind="a FIFO" if "FIFO" in case else "file")
    with pytest.raises(EquivcheckError, match=match) as info:
        runtime_side(f"{src}:fc", Shape(channels=3, spatial=(4, 5)))
    assert "\n" not in str(info.value)
    assert True not in onnx_load_spy  # onnx never loaded the external data


def test_explore_onnx_external_data_cli_is_one_line(tmp_path, small_budget, capsys):
    src = onnx_external_model(tmp_path, (6, 60), 5 << 30, length=False)
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}  # 5 GiB: not read back
    code = main(["explore", "--source", f"{src}:fc", "--to", "torch:dense", "--channels", "3", "--spatial", "4,5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the entry says 5368709120" in err, err
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_explore_onnx_with_external_data_in_bounds_still_loads(tmp_path):
    from equivcheck.exploration.runtimes import runtime_side
    from equivcheck.specs import Shape

    pytest.importorskip("onnxruntime", reason="onnxruntime runs the side")
    from onnx import numpy_helper

    from tests.test_files_runtimes import external, onnx_file

    (tmp_path / "w.bin").write_bytes(KERNEL.T.copy().tobytes())
    src = onnx_file(tmp_path / "m.onnx", initializers=[external("W", KERNEL.T.copy(), "w.bin"), numpy_helper.from_array(BIAS, "b")])
    side = runtime_side(f"{src}:fc", Shape(channels=3, spatial=(4, 5)))
    assert side is not None

"""Hostile weight files and outputs, catalogued: one line, exit 2, nothing written, nothing huge allocated.

Each case builds a small file that once fooled the loaders (HDF5 external storage, a zip bomb,
an expanded torch tensor...) and checks the refusal; a hypothesis fuzz feeds damaged versions
of valid files to the loaders.
"""

from __future__ import annotations

import io
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


@pytest.mark.parametrize("name, build", [
    ("external storage", lambda tmp: h5_file(tmp, external_storage)),
    ("zip bomb", lambda tmp: forged_npz(tmp, "kernel.npy", npy_header((1 << 20, 1 << 20)) + bytes(64))),
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
    else:
        files.save_arrays(path, {"kernel": KERNEL, "bias": BIAS})
    return path


def redeclared(path: Path, kind: str) -> bytes:
    """``path`` rebuilt whole (valid container, checksums) but declaring its kernel far larger than the data it holds."""
    data = path.read_bytes()
    if kind == "h5":  # the dataspace's dims, same length in place
        return data.replace(struct.pack("<QQ", 60, 6), struct.pack("<QQ", 1 << 40, 6))
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


@settings(max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["npz", "safetensors", "h5", "pt"]), st.sampled_from(["truncate", "flip", "flip", "redeclare"]),
       st.floats(0, 1), st.integers(0, 7))
def test_damaged_files_give_an_equivcheck_error_or_arrays(kind, how, where, bit):
    with tempfile.TemporaryDirectory() as folder:
        path = valid_file(kind, Path(folder))
        path.write_bytes(damage(path, kind, how, where, bit))
        saved = memory.physical_memory
        memory.physical_memory = lambda: 64 << 20  # a 32 MiB guard: a huge re-declared array must not get through
        try:
            arrays = files.load_arrays(path)
        except EquivcheckError as exc:
            assert "\n" not in str(exc)
        else:
            assert all(isinstance(a, np.ndarray) and a.nbytes <= 32 << 20 for a in arrays.values())
        finally:
            memory.physical_memory = saved

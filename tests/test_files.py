"""Weight files: every format round-trips, nothing that could run code is loaded, writes are atomic."""

from __future__ import annotations

import fractions

import numpy as np
import pytest

from equivcheck import files
from equivcheck.cli import main
from equivcheck.errors import FileFormatError

ARRAYS = {"kernel": np.arange(60, dtype=np.float32).reshape(60, 1).repeat(6, 1) / 7, "bias": np.linspace(-1, 1, 6, dtype=np.float32)}
SMALL = ["--channels", "3", "--spatial", "4,5", "--units", "6"]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt", ".pth"])
def test_arrays_round_trip(tmp_path, suffix):
    if suffix in (".pt", ".pth"):
        pytest.importorskip("torch", reason="torch writes .pt files")
    path = tmp_path / f"w{suffix}"
    files.save_arrays(path, ARRAYS)
    back = files.load_arrays(path)
    assert set(back) == set(ARRAYS) and all(np.array_equal(back[k], v) for k, v in ARRAYS.items())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    with pytest.raises(FileFormatError, match="already exists"):
        files.save_arrays(path, ARRAYS)


def test_h5_datasets_are_read_by_path(tmp_path):
    h5py = pytest.importorskip("h5py", reason="h5py reads HDF5")
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = ARRAYS["kernel"]
    assert np.array_equal(files.load_arrays(path)["layers/dense/vars/0"], ARRAYS["kernel"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_convert_cli_reads_and_writes_other_formats(tmp_path, capsys, suffix):
    torch = pytest.importorskip("torch", reason="torch state dicts") if suffix == ".pt" else None
    src = tmp_path / f"dense{suffix}"
    if torch is not None:
        torch.save({"weight": torch.from_numpy(ARRAYS["kernel"]), "bias": torch.from_numpy(ARRAYS["bias"])}, src)
    else:
        files.save_arrays(src, ARRAYS)
    out = tmp_path / f"conv{suffix}"
    assert main(["convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL, str(src), str(out)]) == 0
    got = files.load_arrays(out)
    expect = ARRAYS["kernel"].reshape(4, 5, 3, 6).transpose(3, 2, 0, 1)
    assert np.array_equal(got["kernel"], expect) and np.array_equal(got["bias"], ARRAYS["bias"])


def test_pickled_objects_in_a_torch_file_are_refused(tmp_path):
    torch = pytest.importorskip("torch", reason="torch files")
    path = tmp_path / "obj.pt"
    torch.save({"weight": torch.zeros(2), "why": fractions.Fraction(1, 3)}, path)  # an object a pickle rebuilds
    with pytest.raises(FileFormatError, match="could run code when loaded: pickled code refused") as info:
        files.load_arrays(path)
    assert "\n" not in str(info.value)


def test_checkpoint_dict_yields_its_state_dict(tmp_path):
    torch = pytest.importorskip("torch", reason="torch files")
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"fc": {"weight": torch.ones(2, 2)}}}, path)
    assert list(files.load_arrays(path)) == ["fc.weight"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".h5"])
def test_corrupt_files_give_one_line(tmp_path, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch", reason="torch files")
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FileFormatError, match="not a readable") as info:
        files.load_arrays(path)
    assert "\n" not in str(info.value)


def test_unknown_output_suffix_and_a_broken_keras_archive(tmp_path):
    with pytest.raises(FileFormatError, match=r"expected \.npz or \.npy"):
        files.save_arrays(tmp_path / "w.csv", ARRAYS)
    (tmp_path / "m.keras").write_bytes(b"PK")
    with pytest.raises(FileFormatError, match=r"m\.keras' is not a readable weight file: truncated or corrupt \(BadZipFile"):
        files.load_arrays(tmp_path / "m.keras")  # its weights are read as arrays: the archive is opened, never Keras


def test_interrupted_safetensors_write_keeps_the_old_file(tmp_path, monkeypatch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors")
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")

    def explode(arrays, filename):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_numpy, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        files.save_arrays(path, ARRAYS, force=True)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_path_suffix_ends_the_temporary_name(tmp_path):
    target = tmp_path / "m.weights.h5"
    with files.atomic_path(target, suffix=".tmp.weights.h5") as tmp:
        assert tmp.name.endswith(".tmp.weights.h5") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_legacy_and_weights_only_keras_files_are_explained(tmp_path):
    for name, match in (("m.h5", "legacy HDF5 model"), ("m.weights.h5", "weights without the architecture"),
                        ("m.onnx", "expected a .keras model")):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(FileFormatError, match=match):
            files.load_keras_model(tmp_path / name)

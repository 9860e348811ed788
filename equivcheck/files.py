"""Weight files: safe reading, atomic writing.

Nothing that could run code is loaded: ``.npz``/``.npy`` load with ``allow_pickle=False``,
torch ``.pt``/``.pth`` with ``torch.load(..., weights_only=True)`` (a pickled module is
refused), ``.safetensors`` and HDF5 (``.h5``, Keras ``.weights.h5``) hold plain arrays, and
Keras ``.keras`` models load with ``safe_mode=True`` (a Lambda layer is refused). Writes go
to a temporary file in the target folder, are flushed to disk, then renamed over the target,
so a reader never sees half a file and an interrupted write leaves nothing behind.

| suffix | read | write |
| --- | --- | --- |
| ``.npz`` / ``.npy`` | :func:`load_arrays` | :func:`save_arrays` |
| ``.safetensors`` | :func:`load_arrays` | :func:`save_arrays` |
| ``.pt`` / ``.pth`` (a state dict) | :func:`load_arrays` | :func:`save_arrays` |
| ``.h5`` / ``.weights.h5`` | :func:`load_arrays` (every dataset), :func:`load_keras_weights` | :func:`save_keras_weights` |
| ``.keras`` | :func:`load_keras_model` | :func:`save_keras_model` |
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck.errors import FileFormatError, SpecError
from equivcheck.specs import LayerSpec

KERNEL_KEYS = ("kernel", "weight", "w", "W", "arr_0")
BIAS_KEYS = ("bias", "b", "arr_1")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = False, protect: tuple = (),
                suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    ``suffix`` ends the temporary name (default ``.tmp`` + the target's suffix), for writers
    that insist on a name ending, such as Keras's ``.weights.h5``.
    """
    target = Path(path)
    for other in protect:
        if other is not None and Path(other).exists() and target.exists() and target.resolve() == Path(other).resolve():
            raise FileFormatError(f"output={str(target)!r} is the input file: write to a new file instead")
        if other is not None and target.resolve() == Path(other).resolve():
            raise FileFormatError(f"output={str(target)!r} is the input file: write to a new file instead")
    if target.exists() and not force:
        raise FileFormatError(f"output={str(target)!r} already exists: pass --force (force=True) to replace it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileFormatError(f"output folder={str(folder)!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise FileFormatError(f"output folder={str(folder)!r} is not writable")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp" + target.suffix, dir=folder)
    except OSError as exc:
        raise FileFormatError(f"cannot write in folder={str(folder)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], *, force: bool = True) -> None:
    with atomic_path(path, force=force) as tmp:
        write(tmp)


def _pick(arrays: dict[str, np.ndarray], key: str | None, candidates: tuple[str, ...], what: str, path: Any) -> str | None:
    if key is not None:
        if key not in arrays:
            raise FileFormatError(f"{what} key={key!r} is not in {str(path)!r}: it holds {', '.join(arrays) or 'nothing'}")
        return key
    for k in candidates:
        if k in arrays:
            return k
    return None


TORCH_SUFFIXES = (".pt", ".pth")
H5_SUFFIXES = (".h5", ".hdf5")
ARRAY_SUFFIXES = (".npz", ".npy", ".safetensors", *TORCH_SUFFIXES)


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Named arrays from a weight file (by suffix, see the module table), refusing anything that could run code."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"input={str(p)!r} does not exist or is not a file")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if p.suffix in TORCH_SUFFIXES:
        return _load_torch(p)
    if p.suffix in H5_SUFFIXES:
        return _load_h5(p)
    if p.suffix == ".keras":
        raise FileFormatError(f"input={str(p)!r} is a whole Keras model: load it with equivcheck.files.load_keras_model")
    with open(p, "rb") as fh:
        magic = fh.read(6)
    if magic[:1] == b"\x80":
        raise FileFormatError(f"input={str(p)!r} is a pickle, which could run code when loaded: refused")
    if magic != b"\x93NUMPY" and magic[:2] != b"PK":
        raise FileFormatError(f"input={str(p)!r} is not a readable .npz/.npy file (unknown format)")
    try:
        data = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise FileFormatError(f"input={str(p)!r} holds pickled Python objects, which could run code: refused") from None
        raise FileFormatError(f"input={str(p)!r} is not a readable .npz/.npy file ({exc})") from None
    except Exception as exc:  # OSError, EOFError, zipfile.BadZipFile on a truncated file
        raise FileFormatError(f"input={str(p)!r} is truncated or corrupt ({type(exc).__name__})") from None
    if isinstance(data, np.ndarray):
        return {"kernel": data}
    try:
        with data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        raise FileFormatError(f"input={str(p)!r} holds pickled Python objects, which could run code: refused ({exc})") from None
    except Exception as exc:  # zipfile errors on a truncated archive
        raise FileFormatError(f"input={str(p)!r} is truncated or corrupt ({type(exc).__name__})") from None


def save_arrays(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], *, force: bool = False, protect: tuple = ()) -> None:
    """Write named arrays atomically as ``.npz``, ``.npy`` (one array), ``.safetensors`` or a torch ``.pt``/``.pth`` state dict."""
    p = Path(path)
    if p.suffix not in ARRAY_SUFFIXES:
        raise FileFormatError(f"output={str(p)!r} has suffix {p.suffix!r}: expected .npz or .npy (or .safetensors, .pt, .pth)")
    if p.suffix == ".safetensors":
        safetensors_numpy = _require("safetensors.numpy", "files")
        with atomic_path(p, force=force, protect=protect) as tmp:
            safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        return
    if p.suffix in TORCH_SUFFIXES:
        torch = _require("torch", "torch")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        with atomic_path(p, force=force, protect=protect) as tmp:
            torch.save(tensors, str(tmp))
        return
    with atomic_path(p, force=force, protect=protect) as tmp, open(tmp, "wb") as fh:
        if p.suffix == ".npy":
            if len(arrays) != 1:
                raise FileFormatError(f"output={str(p)!r} is .npy, which holds one array: use .npz for kernel and bias")
            np.save(fh, next(iter(arrays.values())), allow_pickle=False)
        else:
            np.savez(fh, **arrays)


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FileFormatError(f"this file format needs the {module.split('.')[0]!r} package: pip install 'equivcheck[{extra}]'") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _load_safetensors(p: Path) -> dict[str, np.ndarray]:
    safetensors_numpy = _require("safetensors.numpy", "files")
    try:
        arrays = safetensors_numpy.load_file(str(p))
    except Exception as exc:  # SafetensorError on a bad header, truncated data
        raise FileFormatError(f"input={str(p)!r} is not a readable .safetensors file ({_first_line(exc)})") from None
    if not arrays:
        raise FileFormatError(f"input={str(p)!r} holds no arrays")
    return dict(arrays)


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _load_torch(p: Path) -> dict[str, np.ndarray]:
    """A state dict (or a checkpoint dict holding one) through ``torch.load(weights_only=True)``."""
    torch = _require("torch", "torch")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:  # torch's safe unpickler met a class or function
            raise FileFormatError(
                f"input={str(p)!r} holds pickled Python objects beyond tensors (a whole module?), which could run code "
                "when loaded: refused; save model.state_dict() instead"
            ) from None
        raise FileFormatError(f"input={str(p)!r} is not a readable torch file ({_first_line(exc)})") from None
    if isinstance(obj, torch.Tensor):
        return {"kernel": _tensor_to_numpy(obj)}
    if not isinstance(obj, dict):
        raise FileFormatError(f"input={str(p)!r} holds a {type(obj).__name__}: expected a state dict of tensors")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out: dict[str, np.ndarray] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                out[name] = _tensor_to_numpy(v)
            elif isinstance(v, dict):
                walk(v, f"{name}.")

    walk(obj, "")
    if not out:
        raise FileFormatError(f"input={str(p)!r} holds no tensors: expected a state dict")
    return out


def _load_h5(p: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file (Keras ``.weights.h5`` included), keyed by its path."""
    h5py = _require("h5py", "files")
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(p, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    except Exception as exc:  # OSError on a file that is not HDF5 or is truncated
        raise FileFormatError(f"input={str(p)!r} is not a readable HDF5 file ({_first_line(exc)})") from None
    if not out:
        raise FileFormatError(f"input={str(p)!r} holds no arrays")
    return out


# -- Keras ------------------------------------------------------------------------------------
def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """A ``.keras`` model, loaded with ``safe_mode=True``: a file carrying code (a Lambda layer) is refused."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"input={str(p)!r} does not exist or is not a file")
    if p.name.endswith(".weights.h5"):
        raise FileFormatError(f"input={str(p)!r} holds weights without the architecture: save the whole model with "
                              "model.save('model.keras'), or load these into a model with equivcheck.files.load_keras_weights")
    if p.suffix in H5_SUFFIXES:
        raise FileFormatError(f"input={str(p)!r} is a legacy HDF5 model, whose config can carry Python code that cannot be "
                              "loaded safely: re-save it as .keras")
    if p.suffix != ".keras":
        raise FileFormatError(f"input={str(p)!r} has suffix {p.suffix!r}: expected a .keras model")
    keras = _require("keras", "tensorflow")
    try:
        return keras.saving.load_model(str(p), compile=False, safe_mode=True)
    except Exception as exc:
        text = str(exc)
        if "safe_mode" in text or "arbitrary code" in text:
            raise FileFormatError(f"input={str(p)!r} carries Python code (a Lambda layer or a pickled function), which could "
                                  "run when loaded: refused (Keras safe_mode); rebuild that layer as a registered class") from None
        raise FileFormatError(f"input={str(p)!r} is not a readable .keras model ({_first_line(exc)})") from None


def save_keras_model(model: Any, path: str | os.PathLike[str], *, force: bool = False, protect: tuple = ()) -> None:
    """Save a Keras model as ``.keras``, atomically."""
    p = Path(path)
    if p.suffix != ".keras":
        raise FileFormatError(f"output={str(p)!r} has suffix {p.suffix!r}: a Keras model is saved as .keras")
    with atomic_path(p, force=force, protect=protect) as tmp:
        model.save(str(tmp))


def load_keras_weights(model: Any, path: str | os.PathLike[str]) -> Any:
    """Load a ``.weights.h5`` file into ``model`` (plain arrays: no code can run); returns ``model``."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"input={str(p)!r} does not exist or is not a file")
    if not p.name.endswith(".weights.h5"):
        raise FileFormatError(f"input={str(p)!r} is not a Keras weights file: expected a name ending in .weights.h5")
    try:
        model.load_weights(str(p))
    except Exception as exc:
        raise FileFormatError(f"input={str(p)!r} does not fit model {getattr(model, 'name', '')!r} ({_first_line(exc)})") from None
    return model


def save_keras_weights(model: Any, path: str | os.PathLike[str], *, force: bool = False, protect: tuple = ()) -> None:
    """Save ``model``'s weights as ``.weights.h5``, atomically."""
    p = Path(path)
    if not p.name.endswith(".weights.h5"):
        raise FileFormatError(f"output={str(p)!r} is not a Keras weights name: expected it to end in .weights.h5")
    with atomic_path(p, force=force, protect=protect, suffix=".tmp.weights.h5") as tmp:
        model.save_weights(str(tmp))


def convert_file(source: LayerSpec, target: LayerSpec, input: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 force: bool = False, kernel_key: str | None = None, bias_key: str | None = None) -> None:
    """Read ``source``'s weights from ``input``, write ``target``'s to ``output`` atomically."""
    from equivcheck.plan import convert

    if Path(output).exists() and Path(input).exists() and Path(output).resolve() == Path(input).resolve():
        raise FileFormatError(f"output={str(output)!r} is the input file: write to a new file instead")
    arrays = load_arrays(input)
    k = _pick(arrays, kernel_key, KERNEL_KEYS, "kernel", input)
    if k is None:
        raise FileFormatError(f"no kernel in {str(input)!r}: it holds {', '.join(arrays)}; name one with --kernel-key")
    b = _pick(arrays, bias_key, BIAS_KEYS, "bias", input)
    kernel = arrays[k]
    bias = arrays[b] if b is not None else None
    for name, arr in (("kernel", kernel), ("bias", bias)):
        if arr is not None and not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise FileFormatError(f"{name} dtype={arr.dtype} in {str(input)!r}: expected a floating-point array")
        if arr is not None and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise FileFormatError(f"{name} in {str(input)!r} holds NaN or Inf: refusing to convert it")
    if tuple(kernel.shape) != source.kernel_shape:
        raise SpecError(f"kernel shape={tuple(kernel.shape)} in {str(input)!r} does not match {source.describe()}: expected {source.kernel_shape}")
    new_kernel, new_bias = convert(source, target, kernel, bias)
    out = {"kernel": new_kernel}
    if new_bias is not None:
        out["bias"] = new_bias
    if Path(output).suffix == ".npy" and new_bias is not None:
        out = {"kernel": new_kernel}
        if bias is not None:
            raise FileFormatError(f"output={str(output)!r} is .npy, which holds one array: use .npz to keep the bias")
    save_arrays(output, out, force=force, protect=(input,))

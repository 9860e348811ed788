"""Weight files: safe reading, atomic writing.

Nothing that could run code is loaded: ``.npz``/``.npy`` load with ``allow_pickle=False``,
torch ``.pt``/``.pth`` with ``torch.load(..., weights_only=True)`` (a pickled module is
refused), ``.safetensors`` and HDF5 (``.h5``, Keras ``.weights.h5``) hold plain arrays, and
Keras ``.keras`` models load with ``safe_mode=True`` (a Lambda layer is refused). ONNX
initializers, TFLite buffers and a ``.keras`` archive's weights are read as arrays without
running or building the model (see :mod:`equivcheck.model_weights`). Writes go
to a temporary file in the target folder, are flushed to disk, then renamed over the target,
so a reader never sees half a file and an interrupted write leaves nothing behind.

| suffix | read | write |
| --- | --- | --- |
| ``.npz`` / ``.npy`` | :func:`load_arrays` | :func:`save_arrays` |
| ``.safetensors`` | :func:`load_arrays` | :func:`save_arrays` |
| ``.pt`` / ``.pth`` (a state dict) | :func:`load_arrays` | :func:`save_arrays` |
| ``.h5`` / ``.weights.h5`` | :func:`load_arrays` (every dataset), :func:`load_keras_weights` | :func:`save_keras_weights` |
| ``.keras`` | :func:`load_arrays` (its weights), :func:`load_keras_model` | :func:`save_keras_model` |
| ``.onnx`` (initializers) / ``.tflite`` (constant tensors) | :func:`load_arrays` | |

In a model (``.onnx``, ``.tflite``, ``.keras``) ``convert`` takes the kernel and bias of its
one linear node (Gemm/MatMul/Conv/ConvTranspose; FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D/
TRANSPOSE_CONV; a Dense/Conv layer) unless ``--kernel-key`` names one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck import _arrays, file_index, model_weights
from equivcheck.errors import EquivcheckError, FileFormatError, SpecError
from equivcheck.memory import require_memory
from equivcheck.specs import LayerSpec

KERNEL_KEYS = ("kernel", "weight", "w", "W", "arr_0")
BIAS_KEYS = ("bias", "b", "arr_1")


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str | os.PathLike[str], *, force: bool = False, protect: tuple = ()) -> Path:
    """Refuse, before any work, an output that is an input, exists (without ``force``), or cannot be a new file."""
    target = Path(path)
    name_max = 255
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(target.parent if str(target.parent) else ".", "PC_NAME_MAX")
    if len(os.fsencode(target.name)) > name_max:
        raise FileFormatError(f"output name of {len(os.fsencode(target.name))} bytes is too long: expected at most {name_max}")
    for other in protect:
        if other is not None and _same_file(target, other):
            raise FileFormatError(f"output={str(target)!r} is the input file: write to a new file instead")
    try:
        os.stat(target)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a symlink loop, a path through a file, a name too long for the system
        raise FileFormatError(f"output={str(target)!r} cannot be written: {exc.strerror or exc}") from None
    if target.is_dir():
        raise FileFormatError(f"output={str(target)!r} is a directory: expected a file name")
    if os.path.lexists(target) and not force:  # a dangling symlink counts: writing through it would create its target
        raise FileFormatError(f"output={str(target)!r} already exists: pass --force (force=True) to replace it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileFormatError(f"output folder={str(folder)!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise FileFormatError(f"output folder={str(folder)!r} is not writable")
    return target


def _umask() -> int:
    """This process's umask, read without changing it where Linux says (thread-safe)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``target``: replacing it with ``force``, else only if no one created it meanwhile."""
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic create-if-absent: of two racing writers exactly one wins
    except FileExistsError:
        raise FileFormatError(f"output={str(target)!r} already exists (another writer made it meanwhile): pass --force "
                              "(force=True) to replace it") from None
    except OSError:  # a file system without hard links: claim the name exclusively, then replace it
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise FileFormatError(f"output={str(target)!r} already exists (another writer made it meanwhile): pass "
                                  "--force (force=True) to replace it") from None
        os.replace(tmp, target)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = False, protect: tuple = (),
                suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path`` in one atomic step.

    Without ``force`` the move creates ``path`` only if it still does not exist (a hard link),
    so of two racing writers one wins and the other gets a :class:`FileFormatError`. The file
    gets the mode a new file would (``0o666`` less the umask). ``suffix`` ends the temporary
    name (default ``.tmp`` + the target's suffix), for writers that insist on a name ending,
    such as Keras's ``.weights.h5``.
    """
    target = check_output(path, force=force, protect=protect)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:48]}.", suffix=suffix or ".tmp" + target.suffix[:16], dir=folder)
    except OSError as exc:
        raise FileFormatError(f"cannot write in folder={str(folder)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        _publish(tmp_path, target, force)
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


def load_arrays(path: str | os.PathLike[str], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Named arrays from a weight file (by suffix, see the module table), refusing anything that could run code.

    ``keys``: read only these (default: all). Sizes are checked from the file's headers
    against the memory guard before anything is inflated or read.
    """
    p = _input(path)
    with model_weights.open_index(p) as index:
        if not index:
            raise FileFormatError(f"input={str(p)!r} holds no arrays")
        names = list(index) if keys is None else [_pick(index, k, (), "array", p) for k in keys]
        require_memory(f"reading {str(p)!r}", sum(index[k].nbytes for k in names))
        return {k: index[k].load(repr(str(p))) for k in names}


def _input(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        regular = False
    if not regular:
        raise FileFormatError(f"input={str(p)!r} does not exist or is not a file")
    return p


def _storable(p: Path, name: str, array: Any) -> np.ndarray:
    """``array`` as the format of ``p`` can hold it (native byte order), or a one-line refusal."""
    array = np.asarray(array)
    _arrays.check_dtype(array.dtype, f"{name}")
    if array.dtype.byteorder not in "=|":
        array = array.astype(array.dtype.newbyteorder("="))
    ml = array.dtype.type.__module__ == "ml_dtypes"
    if ml and p.suffix in (".npz", ".npy"):
        raise FileFormatError(f"{name} dtype={array.dtype} cannot be written to {p.suffix} (numpy would record it as void "
                              f"|V{array.dtype.itemsize}, unreadable): write .safetensors or .pt, or cast to float32")
    if ml and array.dtype.name != "bfloat16" and p.suffix in TORCH_SUFFIXES:
        raise FileFormatError(f"{name} dtype={array.dtype} cannot be written to {p.suffix}: cast to bfloat16 or float32")
    if array.dtype.itemsize > 8 and p.suffix not in (".npz", ".npy"):
        raise FileFormatError(f"{name} dtype={array.dtype} cannot be written to {p.suffix}: cast to float64 or write .npz")
    return np.ascontiguousarray(array)


def _to_tensor(array: np.ndarray) -> Any:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def save_arrays(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], *, force: bool = False, protect: tuple = ()) -> None:
    """Write named arrays atomically as ``.npz``, ``.npy`` (one array), ``.safetensors`` or a torch ``.pt``/``.pth`` state dict.

    bfloat16 goes to ``.safetensors`` and ``.pt``; ``.npz`` cannot record it and refuses.
    """
    p = Path(path)
    if p.suffix not in ARRAY_SUFFIXES:
        raise FileFormatError(f"output={str(p)!r} has suffix {p.suffix!r}: expected .npz or .npy (or .safetensors, .pt, .pth)")
    if p.suffix == ".npy" and len(arrays) != 1:
        raise FileFormatError(f"output={str(p)!r} is .npy, which holds one array: use .npz for kernel and bias")
    check_output(p, force=force, protect=protect)
    arrays = {k: _storable(p, k, v) for k, v in arrays.items()}
    if p.suffix == ".safetensors":
        safetensors_numpy = _require("safetensors.numpy", "files")
        with atomic_path(p, force=force, protect=protect) as tmp:
            safetensors_numpy.save_file(arrays, str(tmp))
        return
    if p.suffix in TORCH_SUFFIXES:
        torch = _require("torch", "torch")
        tensors = {k: _to_tensor(v) for k, v in arrays.items()}
        with atomic_path(p, force=force, protect=protect) as tmp:
            torch.save(tensors, str(tmp))
        return
    with atomic_path(p, force=force, protect=protect) as tmp, open(tmp, "wb") as fh:
        if p.suffix == ".npy":
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


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 as ml_dtypes.bfloat16)."""
    return _arrays.to_numpy(t)




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
    try:  # what building it would allocate, from the archive alone: refused before Keras reads it
        require_memory(f"loading {str(p)!r}", 2 * file_index.keras_declared_bytes(p, repr(str(p))))
    except EquivcheckError:
        raise
    except (OSError, zipfile.BadZipFile, zlib.error, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise FileFormatError(f"input={str(p)!r} is not a readable .keras model ({_first_line(exc)})") from None
    if "tensorflow" not in sys.modules:  # TensorFlow's own start-up lines are not equivcheck's output
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = _require("keras", "tensorflow")
    try:
        with warnings.catch_warnings():  # Keras' and TensorFlow's own warnings while reading the file
            warnings.simplefilter("ignore")
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
    """Read ``source``'s weights from ``input``, write ``target``'s to ``output`` atomically.

    The output is checked first, then the kernel's declared shape and dtype; only the kernel and
    bias are read, and only after the memory guard.
    """
    from equivcheck.planning import convert

    check_output(output, force=force, protect=(input,))
    kernel, bias = _read_weights(source, _input(input), kernel_key, bias_key)
    new_kernel, new_bias = convert(source, target, kernel, bias)
    out = {"kernel": new_kernel}
    if new_bias is not None and Path(output).suffix != ".npy":
        out["bias"] = new_bias
    elif bias is not None and Path(output).suffix == ".npy":
        raise FileFormatError(f"output={str(output)!r} is .npy, which holds one array: use .npz to keep the bias")
    save_arrays(output, out, force=force, protect=(input,))


def _read_weights(source: LayerSpec, p: Path, kernel_key: str | None, bias_key: str | None) -> tuple[np.ndarray, Any]:
    """The kernel and (if any) bias of ``source`` from ``p``, declared shapes and dtypes checked before reading."""
    with model_weights.open_index(p) as index:
        if index.graph:
            k, b = _pick_linear(index, kernel_key, bias_key, p)
        else:
            k = _pick(index, kernel_key, KERNEL_KEYS, "kernel", p)
            if k is None:
                raise FileFormatError(f"no kernel in {str(p)!r}: it holds {', '.join(index)[:200] or 'nothing'}; "
                                      "name one with --kernel-key")
            b = _pick(index, bias_key, BIAS_KEYS, "bias", p)
        if index[k].shape != source.kernel_shape:
            raise SpecError(f"kernel shape={index[k].shape} in {str(p)!r} does not match {source.describe()}: "
                            f"expected {source.kernel_shape}")
        picked = [("kernel", index[k])] + ([("bias", index[b])] if b is not None else [])
        require_memory(f"reading {str(p)!r}", sum(e.nbytes for _, e in picked))
        arrays = [_checked_weights(name, e.load(repr(str(p))), p) for name, e in picked]
    return arrays[0], arrays[1] if len(arrays) > 1 else None


def _pick_linear(index: file_index.Index, kernel_key: str | None, bias_key: str | None, p: Path) -> tuple[str, str | None]:
    """Kernel and bias names in a model graph: as named, else those of its one linear node."""
    if kernel_key is None:
        if len(index.linear) != 1:
            raise FileFormatError(f"no single linear layer to take the kernel from in {str(p)!r} ({index.why}): "
                                  "name the kernel with --kernel-key")
        kernel_key = next(iter(index.linear))
    _pick(index, kernel_key, (), "kernel", p)
    return kernel_key, _pick(index, bias_key, (), "bias", p) if bias_key is not None else index.linear.get(kernel_key)


def _checked_weights(name: str, arr: np.ndarray, p: Path) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise FileFormatError(f"{name} dtype={arr.dtype} in {str(p)!r}: expected a floating-point array")
    if not np.all(np.isfinite(arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr)):
        raise FileFormatError(f"{name} in {str(p)!r} holds NaN or Inf: refusing to convert it")
    return arr

"""Weight files: safe reading, atomic writing.

Nothing is unpickled: ``.npz``/``.npy`` load with ``allow_pickle=False``. Writes go to a
temporary file in the target folder, are flushed to disk, then renamed over the target, so
a reader never sees half a file and an interrupted write leaves nothing behind.
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
def atomic_path(path: str | os.PathLike[str], *, force: bool = False, protect: tuple = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
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
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=folder)
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


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays from a ``.npz`` or ``.npy`` file, refusing pickled objects."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"input={str(p)!r} does not exist or is not a file")
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
    p = Path(path)
    if p.suffix not in (".npz", ".npy"):
        raise FileFormatError(f"output={str(p)!r} has suffix {p.suffix!r}: expected .npz or .npy")
    with atomic_path(p, force=force, protect=protect) as tmp, open(tmp, "wb") as fh:
        if p.suffix == ".npy":
            if len(arrays) != 1:
                raise FileFormatError(f"output={str(p)!r} is .npy, which holds one array: use .npz for kernel and bias")
            np.save(fh, next(iter(arrays.values())), allow_pickle=False)
        else:
            np.savez(fh, **arrays)


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

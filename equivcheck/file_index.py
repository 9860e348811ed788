"""What an untrusted weight file declares, before any array is read.

:func:`open_index` lists a file's arrays as :class:`Entry` records (name, declared shape and
dtype, size in bytes) from headers alone: ``.npy`` headers (inside an ``.npz`` too), the
safetensors JSON header, HDF5 dataset metadata, torch tensors loaded memory-mapped. Nothing is
inflated or copied until an entry is read, and a read first passes the memory guard
(:func:`equivcheck.specs.require_memory`) with the declared size. What cannot be read safely
(pickled objects, HDF5 external storage, virtual datasets or external links, complex or
structured dtypes, sizes that disagree with the file) is refused with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck import _arrays
from equivcheck.errors import EquivcheckError, FileFormatError, MappingError
from equivcheck.memory import require_memory

_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1 << 16  # a .npy header is a short dict; numpy's own limit is 10 000 bytes
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit of the safetensors library itself
_SAFE_H5_FILTERS = {1, 2, 3, 4, 5, 6, 32000}  # deflate, shuffle, fletcher32, szip, nbit, scaleoffset, lzf


@dataclass(frozen=True)
class Entry:
    """One array a file declares; ``load()`` reads it after the memory guard."""

    name: str
    shape: tuple[int, ...]
    dtype: Any  # a numpy dtype, or a display name where the array cannot be read
    read: Callable[[], np.ndarray]
    problem: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(self.dtype, "itemsize", 0)

    def load(self, where: str) -> np.ndarray:
        if self.problem:
            raise FileFormatError(f"{self.name!r} in {where}: {self.problem}")
        require_memory(f"reading {self.name!r} from {where}", self.nbytes)
        array = self.read()
        if tuple(array.shape) != self.shape:
            raise FileFormatError(f"{self.name!r} in {where} holds shape={tuple(array.shape)}: its header declared {self.shape}")
        return array


class Index(dict[str, Entry]):
    """A file's entries by name; for a model graph (``graph``), also its linear nodes.

    ``linear`` maps each linear node's stored weight to its stored bias (or None); ``why``
    describes them in one line, for the message when there is not exactly one.
    """

    def __init__(self, *, graph: bool = False) -> None:
        super().__init__()
        self.graph = graph
        self.linear: dict[str, str | None] = {}
        self.why = ""


def refused_pickle(where: str, what: str, hint: str = "") -> FileFormatError:
    return FileFormatError(f"input={where} {what}, which could run code when loaded: pickled code refused{hint}")


def corrupt(where: str, exc: BaseException) -> FileFormatError:
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__
    return FileFormatError(f"input={where} is not a readable weight file: truncated or corrupt ({detail})")


def dtype_problem(dtype: Any) -> str | None:
    try:
        _arrays.check_dtype(np.dtype(dtype), "dtype")
    except (MappingError, TypeError) as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def open_index(p: Path, openers: dict[str, Callable[[Path, str], Any]] | None = None) -> Iterator[Index]:
    """The arrays ``p`` declares, by name; the file stays open (for reads) inside the block.

    ``openers``: further formats by suffix (the model files of :mod:`equivcheck.model_weights`,
    whose ``open_index`` passes them), beside the weight files read here.
    """
    where = repr(str(p))
    opener = {".safetensors": _safetensors, ".pt": _torch, ".pth": _torch, ".h5": _h5, ".hdf5": _h5, ".keras": _keras,
              **(openers or {})}.get(p.suffix, _numpy)
    try:
        with opener(p, where) as entries:
            if isinstance(entries, Index):
                yield entries
            else:
                index = Index()
                index.update(entries)
                yield index
    except EquivcheckError:
        raise
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, RecursionError,
            zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, SystemError, struct.error) as exc:
        raise corrupt(where, exc) from None


def read_exactly(fh: Any, shape: tuple[int, ...], dtype: np.dtype, fortran: bool = False) -> np.ndarray:
    """Read ``shape`` items of ``dtype`` from ``fh`` into a new array, or fail on a short file."""
    out = np.empty(math.prod(shape), dtype)
    view = memoryview(out.view(np.uint8))
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise EOFError(f"expected {len(view)} bytes of array data, got {done}")
        done += n
    return out.reshape(shape[::-1]).T if fortran else out.reshape(shape)


# -- .npy / .npz --------------------------------------------------------------------------------
def _npy_header(fh: Any, where: str, name: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """shape, dtype, Fortran order and header length of the ``.npy`` stream at ``fh`` (at its start)."""
    if fh.read(6) != _NPY_MAGIC:
        raise FileFormatError(f"{name!r} in {where} is not a .npy array (no \\x93NUMPY magic): expected a file "
                              "written by numpy.save/savez")
    major = fh.read(2)[:1]
    if major not in (b"\x01", b"\x02", b"\x03"):
        raise FileFormatError(f"{name!r} in {where} has .npy format version={major!r}: expected 1, 2 or 3")
    reader = np.lib.format.read_array_header_1_0 if major == b"\x01" else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(fh, max_header_size=_MAX_HEADER)
    return tuple(int(s) for s in shape), dtype, bool(fortran), fh.tell()


def _npy_entry(name: str, where: str, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
               reader: Callable[[], np.ndarray]) -> Entry:
    if dtype.hasobject:
        raise refused_pickle(where, f"holds {name!r}, an array of pickled Python objects")
    return Entry(name, shape, dtype, reader, dtype_problem(dtype))


def _check_npy_size(name: str, where: str, declared: int, header: int, size: int) -> None:
    if header + declared != size:
        raise FileFormatError(f"{name!r} in {where} declares {declared} bytes of data but holds {size - header}: "
                              "truncated or re-declared")


@contextlib.contextmanager
def _numpy(p: Path, where: str) -> Iterator[dict[str, Entry]]:
    with open(p, "rb") as fh:
        magic = fh.read(6)
        fh.seek(0)
        if magic[:1] == b"\x80":
            raise refused_pickle(where, "is a pickle")
        if magic == _NPY_MAGIC:
            yield {"kernel": _npy_file_entry(fh, where, os.fstat(fh.fileno()).st_size)}
        elif magic[:2] == b"PK":
            with zipfile.ZipFile(fh) as archive:
                yield {e.name: e for e in (_npz_entry(archive, info, where) for info in archive.infolist())}
        else:
            raise FileFormatError(f"input={where} is not a readable .npz/.npy file (unknown format)")


def _npy_file_entry(fh: Any, where: str, size: int) -> Entry:
    shape, dtype, fortran, header = _npy_header(fh, where, "kernel")
    entry = _npy_entry("kernel", where, shape, dtype, fortran, lambda: _seek_read(fh, header, shape, dtype, fortran))
    _check_npy_size("kernel", where, entry.nbytes, header, size)
    return entry


def _seek_read(fh: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool) -> np.ndarray:
    fh.seek(offset)
    return read_exactly(fh, shape, dtype, fortran)


def _npz_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Entry:
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        head = io.BytesIO(member.read(_MAX_HEADER + 16))
    shape, dtype, fortran, header = _npy_header(head, where, name)

    def read() -> np.ndarray:
        with archive.open(info) as member:
            member.read(header)
            return read_exactly(member, shape, dtype, fortran)

    entry = _npy_entry(name, where, shape, dtype, fortran, read)
    _check_npy_size(name, where, entry.nbytes, header, info.file_size)
    return entry


# -- .safetensors ------------------------------------------------------------------------------
def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes

    plain = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
    return {**{k: np.dtype(v) for k, v in plain.items()}, "BF16": np.dtype(ml_dtypes.bfloat16),
            "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


@contextlib.contextmanager
def _safetensors(p: Path, where: str) -> Iterator[dict[str, Entry]]:
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise FileFormatError(f"input={where} is not a readable .safetensors file (header length={n}, file size={size})")
        header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise FileFormatError(f"input={where} is not a readable .safetensors file (header is not a JSON object)")
        data_start, data_size = 8 + n, size - 8 - n
        yield {k: _safetensors_entry(fh, k, v, where, data_start, data_size) for k, v in header.items() if k != "__metadata__"}


def _safetensors_entry(fh: Any, name: str, info: Any, where: str, start: int, size: int) -> Entry:
    dtypes = _safetensors_dtypes()
    try:
        dtype = dtypes[info["dtype"]] if info["dtype"] in dtypes else info["dtype"]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        valid = all(type(s) is int and s >= 0 for s in (*shape, begin, end)) and isinstance(dtype, (np.dtype, str))
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise FileFormatError(f"input={where} is not a readable .safetensors file (tensor {str(name)[:60]!r} has a malformed entry)")
    if isinstance(dtype, str):
        return Entry(name, shape, dtype, lambda: np.empty(0), f"dtype={dtype[:20]} is not read by equivcheck")
    if not begin <= end <= size or end - begin != math.prod(shape) * dtype.itemsize:
        raise FileFormatError(f"tensor {name!r} in {where} declares shape={shape} dtype={dtype} at bytes {begin}..{end}: "
                              f"expected {math.prod(shape) * dtype.itemsize} bytes within the {size} the file holds")
    return Entry(name, shape, dtype, lambda: _seek_read(fh, start + begin, shape, dtype, False))


# -- HDF5 ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _h5(p: Path | io.BytesIO, where: str) -> Iterator[dict[str, Entry]]:
    import h5py

    with h5py.File(p, "r") as f:
        names: list[bytes] = []
        f.id.links.visit(names.append)  # raw names: a callback that raises (bad UTF-8, a refusal) upsets h5py
        kinds = {name: f.id.links.get_info(name).type for name in names}
        for name, kind in kinds.items():
            if kind == h5py.h5l.TYPE_EXTERNAL:
                target = f.id.links.get_val(name)[0].decode(errors="replace")
                raise FileFormatError(f"input={where} links {_text(name)!r} to another file ({target!r}): external links refused")
        objects = {_text(name): f[name] for name, kind in kinds.items() if kind == h5py.h5l.TYPE_HARD}
        yield {name: _h5_entry(obj, name, where) for name, obj in objects.items() if isinstance(obj, h5py.Dataset)}


@contextlib.contextmanager
def _keras(p: Path, where: str) -> Iterator[Index]:
    """A ``.keras`` archive's ``model.weights.h5``, read as HDF5 (Keras itself is not imported: nothing runs)."""
    with zipfile.ZipFile(p) as archive:
        info = next((i for i in archive.infolist() if i.filename == "model.weights.h5"), None)
        if info is None:
            raise FileFormatError(f"input={where} holds no model.weights.h5: expected a .keras file saved by Keras 3")
        require_memory(f"reading {where}", info.file_size)
        with archive.open(info) as member:
            raw = member.read(info.file_size + 1)
        if len(raw) != info.file_size:
            raise FileFormatError(f"input={where} holds a model.weights.h5 of {len(raw)} bytes where the archive declares "
                                  f"{info.file_size}: truncated or re-declared")
        data = io.BytesIO(raw)
    with _h5(data, where) as entries:
        index = Index(graph=True)
        index.update(entries)
        groups: dict[str, list[str]] = {}
        for name in index:
            folder, _, leaf = name.rpartition("/vars/")
            if folder:
                groups.setdefault(folder, []).append(leaf)
        for folder, leaves in groups.items():
            if "0" in leaves and len(index[f"{folder}/vars/0"].shape) >= 2 and set(leaves) <= {"0", "1"}:
                bias = f"{folder}/vars/1" if "1" in leaves and len(index[f"{folder}/vars/1"].shape) == 1 else None
                index.linear[f"{folder}/vars/0"] = bias
        listed = ", ".join(repr(k[:60]) for k in list(index.linear)[:8])
        index.why = (f"{len(index.linear)} layers with a kernel: {listed}" if index.linear
                     else f"no layer with a kernel; it holds {', '.join(list(index)[:12])[:200] or 'no arrays'}")
        yield index


#: A .keras archive's config.json above this is not a model config a person wrote or saved.
KERAS_CONFIG_MAX = 64 << 20


def keras_declared_bytes(p: Path, where: str) -> int:
    """What building a ``.keras`` model allocates, from its archive alone, before Keras sees it.

    The unpacked members (as the zip declares them) and the weights of each layer its config
    declares (``build_config.input_shape`` with ``units``/``filters``/``kernel_size``/...), in float32.
    """
    with zipfile.ZipFile(p) as archive:
        infos = archive.infolist()
        unpacked = sum(i.file_size for i in infos)
        config = next((i for i in infos if i.filename == "config.json"), None)
        if config is None:
            raise FileFormatError(f"input={where} holds no config.json: expected a .keras file saved by Keras 3")
        if config.file_size > KERAS_CONFIG_MAX:
            raise FileFormatError(f"input={where} declares a config.json of {config.file_size} bytes: "
                                  f"more than the {KERAS_CONFIG_MAX} a saved model's config takes")
        text = archive.read(config)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FileFormatError(f"input={where} has a config.json that is not JSON ({str(exc)[:80]})") from None
    return unpacked + 4 * _declared_weights(doc)


def _declared_weights(node: Any) -> int:
    """Weights of every layer config under ``node`` whose input shape is recorded (others: 0)."""
    total = 0
    if isinstance(node, dict):
        cfg, build = node.get("config"), node.get("build_config")
        shape = build.get("input_shape") if isinstance(build, dict) else None
        if isinstance(cfg, dict) and isinstance(shape, list) and shape and all(isinstance(d, int) or d is None for d in shape):
            total += _layer_weights(str(node.get("class_name", "")), cfg, [d or 1 for d in shape])
        total += sum(_declared_weights(v) for v in node.values() if isinstance(v, (dict, list)))
    elif isinstance(node, list):
        total += sum(_declared_weights(v) for v in node)
    return total


def _layer_weights(kind: str, cfg: dict[str, Any], shape: list[int]) -> int:
    def count(value: Any) -> int:
        values = value if isinstance(value, list) else [value]
        return math.prod(v if isinstance(v, int) and v > 0 else 1 for v in values)

    channels = shape[1] if cfg.get("data_format") == "channels_first" and len(shape) > 2 else shape[-1]
    if kind in ("Dense", "EinsumDense"):
        return channels * count(cfg.get("units", cfg.get("output_shape"))) + count(cfg.get("units", 0))
    if kind.startswith(("Conv", "SeparableConv")):
        return count(cfg.get("kernel_size")) * channels * count(cfg.get("filters")) + count(cfg.get("filters"))
    if kind.startswith("DepthwiseConv"):
        return count(cfg.get("kernel_size")) * channels * count(cfg.get("depth_multiplier", 1))
    if kind == "Embedding":
        return count(cfg.get("input_dim")) * count(cfg.get("output_dim"))
    return 4 * channels if "Normalization" in kind else 0


def _text(name: bytes) -> str:
    return name.decode(errors="replace")


def _h5_entry(ds: Any, name: str, where: str) -> Entry:
    plist = ds.id.get_create_plist()
    if ds.is_virtual:
        raise FileFormatError(f"dataset {name!r} in {where} is virtual (its data lives in other files): refused")
    if plist.get_external_count():
        raise FileFormatError(f"dataset {name!r} in {where} keeps its data in an external file: refused")
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if filters - _SAFE_H5_FILTERS:
        raise FileFormatError(f"dataset {name!r} in {where} needs HDF5 filter(s) {sorted(filters - _SAFE_H5_FILTERS)}: "
                              "only deflate, shuffle, fletcher32, szip, nbit, scaleoffset and lzf are read")
    if ds.shape is None:
        return Entry(name, (), "empty", lambda: np.empty(0), "an empty dataset holds no array")
    return Entry(name, tuple(int(s) for s in ds.shape), ds.dtype, lambda: np.asarray(ds[()]), dtype_problem(ds.dtype))


# -- torch ---------------------------------------------------------------------------------------
def _torch_problem(t: Any) -> str | None:
    """Why ``t`` cannot be read as a plain array, or None."""
    name = str(t.dtype).removeprefix("torch.")
    if t.is_quantized or t.is_meta or str(t.layout) != "torch.strided":
        kind = "quantized" if t.is_quantized else "meta (holds no data)" if t.is_meta else str(t.layout).removeprefix("torch.")
        return f"a {kind} tensor (dtype={name}) is not a plain array: save t.dequantize() / t.to_dense() instead"
    if name.startswith("float8") or t.dtype.is_complex or name.startswith(("uint1", "uint2", "uint3", "uint4", "int1")):
        return f"dtype={name} is not read by equivcheck: save it as float32, float16 or bfloat16"
    return None


def _torch_extent(t: Any) -> int:
    """Bytes of storage a strided tensor reaches from its offset (0 for an empty one)."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return (last + 1) * t.element_size()


def _torch_entry(t: Any, name: str, where: str) -> Entry:
    problem = _torch_problem(t)
    shape = tuple(int(s) for s in t.shape)
    if problem:
        return Entry(name, shape, str(t.dtype).removeprefix("torch."), lambda: np.empty(0), problem)
    if min(t.stride(), default=1) < 0 or _torch_extent(t) > t.untyped_storage().nbytes():
        raise FileFormatError(f"tensor {name!r} in {where} reaches past its storage (shape={shape}, stride={t.stride()})")
    dtype = _arrays.to_numpy(t.new_empty(0)).dtype
    return Entry(name, shape, dtype, lambda: np.array(_arrays.to_numpy(t), order="C", copy=True))


def _torch_load(p: Path, where: str) -> Any:
    import torch

    mmap = zipfile.is_zipfile(p)
    if mmap:
        with zipfile.ZipFile(p) as archive:
            infos = archive.infolist()
        require_memory(f"reading {where}", sum(i.file_size for i in infos))
        mmap = all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    try:
        with warnings.catch_warnings():  # torch's own warnings (TypedStorage, pickle protocol) are not the user's
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Check the doc")]
        if any(w in str(exc).lower() for w in ("global", "allowlist", "reduce")):  # torch's safe unpickler met code
            raise refused_pickle(where, "holds pickled Python objects beyond tensors (a whole module?)",
                                 "; save model.state_dict() instead") from None
        raise FileFormatError(f"input={where} is not a readable torch file ({type(exc).__name__}: "
                              f"{(lines or [''])[-1][:120]})") from None


@contextlib.contextmanager
def _torch(p: Path, where: str) -> Iterator[dict[str, Entry]]:
    import torch

    obj = _torch_load(p, where)
    if isinstance(obj, torch.Tensor):
        yield {"kernel": _torch_entry(obj, "kernel", where)}
        return
    if not isinstance(obj, dict):
        raise FileFormatError(f"input={where} holds a {type(obj).__name__}: expected a state dict of tensors")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out: dict[str, Entry] = {}
    stack = [(obj, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                out[name] = _torch_entry(v, name, where)
            elif isinstance(v, dict) and depth < 32:
                stack.append((v, f"{name}.", depth + 1))
    yield out

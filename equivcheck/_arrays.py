"""Index operations on any array kind, dispatched by type.

As in einops' ``_backends``: a framework is recognised only if its module is already in
``sys.modules`` — an array of that kind cannot exist otherwise — so dispatch never imports one.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from equivcheck.errors import MappingError

# Copies above this many bytes go through the cache-blocked path.
_BLOCKED_MIN_BYTES = 1 << 22
# Bytes of source that one block may touch; about an L2 cache.
_BLOCK_BYTES = 1 << 20


class ArrayOps(ABC):
    """Reshape / transpose / flip for one array kind."""

    framework = ""

    @abstractmethod
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is this kind of array (without importing its framework)."""

    def apply(self, x: Any, ops: tuple) -> Any:
        from equivcheck.mapping import Flip, Reshape

        for op in ops:
            if isinstance(op, Reshape):
                x = self.reshape(x, op.shape)
            elif isinstance(op, Flip):
                x = self.flip(x, op.axes) if op.axes else x
            else:
                x = self.transpose(x, op.perm)
        return self.finish(x)

    def finish(self, x: Any) -> Any:
        return x

    def check(self, x: Any, what: str = "array") -> None:
        """Refuse an array whose values are not plain real numbers (see :func:`check_dtype`)."""
        check_dtype(np.dtype(x.dtype), what)

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=like.dtype)


class NumpyOps(ArrayOps):
    framework = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def apply(self, x: np.ndarray, ops: tuple, normal: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """``ops`` applied to ``x``, into ``out`` (C-contiguous, the result's size) when given."""
        from equivcheck.mapping import Reshape, Transpose

        if normal is not None and x.nbytes >= _BLOCKED_MIN_BYTES and x.flags.c_contiguous:
            done = _row_gather_transpose(x, normal, out)
            if done is None:
                done = _column_scatter_transpose(x, normal, out)
            if done is not None:
                return done
        final = None
        if ops and isinstance(ops[-1], Reshape):
            final, ops = ops[-1].shape, ops[:-1]
        view = x
        for op in ops:
            if isinstance(op, Reshape):
                view = view.reshape(op.shape)
            elif isinstance(op, Transpose):
                view = view.transpose(op.perm)
            elif op.axes:
                index = [slice(None)] * view.ndim
                for a in op.axes:
                    index[a] = slice(None, None, -1)
                view = view[tuple(index)]
        result = np.empty(view.shape, dtype=view.dtype) if out is None else out.reshape(view.shape)
        blocked_copy(result, view)
        return result.reshape(final or view.shape) if out is None else out


_POOL: Any = None
_POOL_PID = 0
_WORKERS = min(4, os.cpu_count() or 1)


def _pool() -> Any:
    """The copy threads of this process: a forked child, which inherits none, makes its own."""
    global _POOL, _POOL_PID
    if _POOL is None or os.getpid() != _POOL_PID:
        from concurrent.futures import ThreadPoolExecutor

        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="equivcheck"), os.getpid()
    return _POOL


def _forget_pool() -> None:
    """In a forked child: drop the parent's pool, whose threads did not survive the fork."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _source_order(nf: Any, moved: tuple[int, ...], out_rest: tuple[int, ...]) -> np.ndarray:
    """For each output position along the atoms other than ``moved``, its flat source index.

    The atoms other than ``moved`` keep their input order in the source and appear as
    ``out_rest`` (permuted, some flipped) in the output.
    """
    rest = [a for a in nf.in_atoms if a not in moved]
    order = [rest.index(a) for a in out_rest]
    index = np.arange(math.prod(nf.sizes[a] for a in rest)).reshape([nf.sizes[a] for a in rest] or [1])
    index = index.transpose(order or [0])
    return index[tuple(slice(None, None, -1) if a in nf.flipped else slice(None) for a in out_rest)].ravel()


def _row_gather_transpose(x: np.ndarray, nf: Any, into: np.ndarray | None = None) -> np.ndarray | None:
    """The dense→conv shape of mapping: a 2-D transpose whose rows are permuted and flipped.

    Applies when the input's last axis (say the dense's units) becomes the output's leading
    axes unchanged. Then ``out2d[:, j] = x2d[rows[j], :]``: gather a few source rows into a
    small buffer (contiguous reads) and write them transposed (in cache), two threads at once.
    """
    last = nf.in_groups[-1]
    n = len(last)
    if not last or nf.out_atoms[:n] != last or nf.flipped & set(last):
        return None
    width = x.shape[-1]
    height = x.size // width
    rows = _source_order(nf, last, nf.out_atoms[n:])
    src = x.reshape(height, width)
    out = np.empty((width, height), dtype=x.dtype) if into is None else into.reshape(width, height)
    fast = _fastcopy()
    if fast is not None and x.itemsize in (1, 2, 4, 8):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        share = -(-height // _WORKERS)
        raw_src, raw_out = raw_view(src), raw_view(out)

        def part(j0: int) -> None:
            fast.gather_transpose(raw_src, width, rows[j0 : j0 + share], raw_out, height, j0, x.itemsize)

        list(_pool().map(part, range(0, height, share)))
    else:
        step = 16

        def block(j0: int) -> None:
            out[:, j0 : j0 + step] = np.take(src, rows[j0 : j0 + step], axis=0).T

        list(_pool().map(block, range(0, height, step)))
    return out.reshape(tuple(nf_out_shape(nf))) if into is None else into


def _column_scatter_transpose(x: np.ndarray, nf: Any, into: np.ndarray | None = None) -> np.ndarray | None:
    """The conv→dense shape, the reverse of :func:`_row_gather_transpose` (compiled kernel only).

    Applies when the input's first axis (say the conv's out channels) becomes the output's
    trailing axes unchanged: each source column lands, whole, in one output row.
    """
    fast = _fastcopy()
    first = nf.in_groups[0] if nf.in_groups else ()
    n = len(first)
    if fast is None or x.itemsize not in (1, 2, 4, 8) or not first:
        return None
    if nf.out_atoms[-n:] != first or nf.flipped & set(first):
        return None
    height = x.shape[0]
    width = x.size // height
    rows = np.empty(width, dtype=np.int64)
    rows[_source_order(nf, first, nf.out_atoms[:-n])] = np.arange(width)  # output row of each source column
    src = x.reshape(height, width)
    out = np.empty((width, height), dtype=x.dtype) if into is None else into.reshape(width, height)
    share = -(-width // _WORKERS)
    raw_src, raw_out = raw_view(src), raw_view(out)

    def part(c0: int) -> None:
        fast.scatter_transpose(raw_src, width, rows[c0 : c0 + share], raw_out, c0, x.itemsize)

    list(_pool().map(part, range(0, width, share)))
    return out.reshape(tuple(nf_out_shape(nf))) if into is None else into


def _fastcopy() -> Any:
    """The compiled kernel, or None where it was not built (a fallback, never an error)."""
    if os.environ.get("EQUIVCHECK_NO_FASTCOPY"):
        return None
    try:
        from equivcheck import _fastcopy as module
    except ImportError:
        return None
    return module


def nf_out_shape(nf: Any) -> list[int]:
    return [math.prod(nf.sizes[a] for a in g) for g in nf.out_groups]


def blocked_copy(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` for a C-contiguous ``out``, in cache-sized tiles.

    Copying a transposed view in one go streams through the source with large jumps, and
    each cache line read is evicted before its neighbours are used. Halving the largest
    axis until a tile fits in cache keeps both sides of every tile resident while it is
    copied: the same idea as a cache-oblivious matrix transpose, for any rank.
    """
    if out.nbytes < _BLOCKED_MIN_BYTES or src.flags.c_contiguous:
        np.copyto(out, src)
        return
    tile = list(out.shape)
    while math.prod(tile) * out.itemsize > _BLOCK_BYTES:
        axis = tile.index(max(tile))
        tile[axis] = -(-tile[axis] // 2)
    grid = [range(0, n, t) for n, t in zip(out.shape, tile)]
    for corner in itertools.product(*grid):
        index = tuple(slice(c, c + t) for c, t in zip(corner, tile))
        np.copyto(out[index], src[index])


class TorchOps(ArrayOps):
    framework = "torch"

    def is_array(self, x: Any) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.permute(perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.flip(axes)

    def finish(self, x: Any) -> Any:
        return x.clone(memory_format=sys.modules["torch"].contiguous_format)  # never the caller's storage

    def check(self, x: Any, what: str = "array") -> None:
        if x.is_quantized or x.layout != sys.modules["torch"].strided or x.is_meta:
            kind = "quantized" if x.is_quantized else "meta" if x.is_meta else str(x.layout).removeprefix("torch.")
            raise MappingError(f"{what} is a {kind} torch tensor (dtype={x.dtype}), not a plain array: expected a dense tensor "
                               "with its values (call .dequantize() / .to_dense() first)")
        if x.dtype.is_complex:
            raise MappingError(f"{what} dtype={x.dtype} is not a real numeric type: expected float, bfloat16, integer or bool values")

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return like.new_zeros(shape)


class TensorflowOps(ArrayOps):
    framework = "tensorflow"

    def is_array(self, x: Any) -> bool:
        tf = sys.modules.get("tensorflow")
        return tf is not None and (isinstance(x, (tf.Tensor, tf.Variable)))

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].reshape(x, shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].transpose(x, perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].reverse(x, axes)

    def finish(self, x: Any) -> Any:
        return sys.modules["tensorflow"].identity(x)

    def check(self, x: Any, what: str = "array") -> None:
        dtype = x.dtype
        if not (dtype.is_floating or dtype.is_integer or dtype.is_bool) or dtype.is_quantized:
            raise MappingError(f"{what} dtype={dtype.name} is not a real numeric type: expected float, bfloat16, integer or bool values")

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].zeros(shape, dtype=like.dtype)


class JaxOps(ArrayOps):
    framework = "jax"

    def is_array(self, x: Any) -> bool:
        jax = sys.modules.get("jax")
        return jax is not None and isinstance(x, jax.Array)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.transpose(perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return sys.modules["jax.numpy"].flip(x, axes)

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["jax.numpy"].zeros(shape, dtype=like.dtype)


_REGISTRY: tuple[ArrayOps, ...] = (NumpyOps(), TorchOps(), TensorflowOps(), JaxOps())


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def check_dtype(dtype: np.dtype, what: str = "array") -> None:
    """Refuse a dtype that is not plain real numbers: complex, object, void, structured, text, dates.

    Accepted: numpy's bool, integer and float kinds and the ml_dtypes types (bfloat16, float8...).
    """
    ml_dtypes = sys.modules.get("ml_dtypes")
    plain = dtype.fields is None and dtype.subdtype is None and (
        dtype.kind in "biuf" or (ml_dtypes is not None and dtype.type is getattr(ml_dtypes, dtype.name, None)))
    if not plain:
        raise MappingError(f"{what} dtype={str(dtype)[:60]} is not a real numeric type: expected float, bfloat16, integer "
                           "or bool values")


def raw_view(x: np.ndarray) -> np.ndarray:
    """``x``'s bytes as unsigned integers of its item size: all the compiled kernel may see."""
    check_dtype(x.dtype)
    return x.view(f"u{x.itemsize}")


def ops_for(x: Any) -> ArrayOps:
    """The :class:`ArrayOps` for ``x``'s kind, or a clear error."""
    for ops in _REGISTRY:
        if ops.is_array(x):
            return ops
    raise MappingError(
        f"array of type={type(x).__module__}.{type(x).__qualname__} is not supported: "
        "expected a numpy, torch, tensorflow or jax array"
    )


# torch dtypes numpy lacks, read through an integer view as their ml_dtypes twin.
_TORCH_VIA_INT = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",
                  "float8_e4m3fnuz": "uint8", "float8_e5m2fnuz": "uint8"}


def _torch_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor's values as numpy on the host (bfloat16 and float8 as ml_dtypes), detached."""
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _TORCH_VIA_INT:
        import ml_dtypes

        torch = sys.modules["torch"]
        return t.view(getattr(torch, _TORCH_VIA_INT[name])).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()


def to_numpy(a: Any) -> Any:
    """A torch/tensorflow/jax array as numpy (CPU); anything else unchanged."""
    if hasattr(a, "detach"):
        return _torch_to_numpy(a)
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        return a.numpy()
    return a


def framework_of(x: Any) -> str:
    return ops_for(x).framework

"""The copy kernels behind ``Mapping.apply`` on numpy arrays: cache-blocked, threaded, optional C.

A mapping's result is one copy of a (reshaped, transposed, flipped) view. A large one goes
through a faster path than numpy's element-by-element strided copy:

- the dense↔conv shape of mapping (a 2-D transpose whose rows or columns are permuted and
  flipped) through the compiled kernel ``equivcheck._fastcopy`` (``_fastcopy.c``), or a numpy
  gather where it was not built or ``EQUIVCHECK_NO_FASTCOPY`` is set;
- any other view through :func:`blocked_copy`, in cache-sized tiles.

The compiled kernel only ever sees plain unsigned-integer views of real-number arrays
(:func:`raw_view`): object pointers, records and text never reach a ``memcpy``. The copy threads
belong to the process that made them; a forked child makes its own.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from equivcheck.errors import MappingError
from equivcheck.ops import NormalForm

try:  # optional: built at install where a C compiler is there
    from equivcheck import _fastcopy
except ImportError:
    _fastcopy = None

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

# Copies above this many bytes go through the cache-blocked path.
BLOCKED_MIN_BYTES = 1 << 22
# Bytes of source that one block may touch; about an L2 cache.
_BLOCK_BYTES = 1 << 20


def cores() -> int:
    """The cores this process may run on (a container's share, where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_WORKERS = min(4, cores())
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0


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


def fastcopy() -> Any:
    """The compiled kernel, or None where it was not built or ``EQUIVCHECK_NO_FASTCOPY`` is set
    (a fallback, never an error)."""
    return None if os.environ.get("EQUIVCHECK_NO_FASTCOPY") else _fastcopy


def _pool() -> ThreadPoolExecutor:
    """The copy threads of this process: a forked child, which inherits none, makes its own."""
    global _POOL, _POOL_PID
    if _POOL is None or os.getpid() != _POOL_PID:
        # Imported on first use, so that `import equivcheck` loads no thread machinery.
        from concurrent.futures import ThreadPoolExecutor

        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="equivcheck"), os.getpid()
    return _POOL


def on_cores(fn: Any, items: Any) -> list:
    """``[fn(item) for item in items]`` on this process's copy threads: for work that lets go of the GIL
    (numpy's large operations, the compiled kernels)."""
    return list(_pool().map(fn, items))


def _forget_pool() -> None:
    """In a forked child: drop the parent's pool, whose threads did not survive the fork."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def transpose_copy(x: np.ndarray, nf: NormalForm, into: np.ndarray | None = None) -> np.ndarray | None:
    """The mapping ``nf`` of a large C-contiguous ``x`` when it is the dense↔conv shape, else None.

    The result is a new array of the mapping's output shape, or ``into`` (C-contiguous, that
    size, ``x``'s dtype) filled and returned.
    """
    done = _row_gather_transpose(x, nf, into)
    return done if done is not None else _column_scatter_transpose(x, nf, into)


def _source_order(nf: NormalForm, moved: tuple[int, ...], out_rest: tuple[int, ...]) -> np.ndarray:
    """For each output position along the atoms other than ``moved``, its flat source index.

    The atoms other than ``moved`` keep their input order in the source and appear as
    ``out_rest`` (permuted, some flipped) in the output.
    """
    rest = [a for a in nf.in_atoms if a not in moved]
    order = [rest.index(a) for a in out_rest]
    index = np.arange(math.prod(nf.sizes[a] for a in rest)).reshape([nf.sizes[a] for a in rest] or [1])
    index = index.transpose(order or [0])
    return index[tuple(slice(None, None, -1) if a in nf.flipped else slice(None) for a in out_rest)].ravel()


def _row_gather_transpose(x: np.ndarray, nf: NormalForm, into: np.ndarray | None = None) -> np.ndarray | None:
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
    fast = fastcopy()
    if fast is not None and x.itemsize in (1, 2, 4, 8):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        share = -(-height // _WORKERS)
        raw_src, raw_out = raw_view(src), raw_view(out)

        def part(j0: int) -> None:
            fast.gather_transpose(raw_src, width, rows[j0 : j0 + share], raw_out, height, j0, x.itemsize)

        on_cores(part, range(0, height, share))
    else:
        step = 16

        def block(j0: int) -> None:
            out[:, j0 : j0 + step] = np.take(src, rows[j0 : j0 + step], axis=0).T

        on_cores(block, range(0, height, step))
    return out.reshape(nf.out_shape) if into is None else into


def _column_scatter_transpose(x: np.ndarray, nf: NormalForm, into: np.ndarray | None = None) -> np.ndarray | None:
    """The conv→dense shape, the reverse of :func:`_row_gather_transpose` (compiled kernel only).

    Applies when the input's first axis (say the conv's out channels) becomes the output's
    trailing axes unchanged: each source column lands, whole, in one output row.
    """
    fast = fastcopy()
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

    on_cores(part, range(0, width, share))
    return out.reshape(nf.out_shape) if into is None else into


def blocked_copy(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` for a C-contiguous ``out``, in cache-sized tiles.

    Copying a transposed view in one go streams through the source with large jumps, and
    each cache line read is evicted before its neighbours are used. Halving the largest
    axis until a tile fits in cache keeps both sides of every tile resident while it is
    copied: the same idea as a cache-oblivious matrix transpose, for any rank.
    """
    if out.nbytes < BLOCKED_MIN_BYTES or src.flags.c_contiguous:
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

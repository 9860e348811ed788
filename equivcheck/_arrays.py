"""Index operations on any array kind, dispatched by type: one interface, one class per kind.

As in einops' ``_backends``: a framework is recognised only if its module is already in
``sys.modules`` — an array of that kind cannot exist otherwise — so dispatch never imports one.
Every kind implements the whole of :class:`ArrayOps` with the same signatures; numpy's
:meth:`NumpyOps.apply` adds the fast copy paths of :mod:`equivcheck._copy`.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from equivcheck import _copy
from equivcheck._copy import check_dtype
from equivcheck.errors import MappingError
from equivcheck.ops import Flip, NormalForm, Op, Reshape, Transpose

__all__ = ["ArrayOps", "aligned_empty", "check_dtype", "framework_of", "ops_for", "to_numpy"]


class ArrayOps(ABC):
    """Reshape / transpose / flip, validation and allocation for one array kind."""

    framework = ""

    @abstractmethod
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is this kind of array (without importing its framework)."""

    @abstractmethod
    def check(self, x: Any, what: str = "array") -> None:
        """Refuse an array whose values are not plain real numbers, with one line naming ``what``."""

    @abstractmethod
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        """``x`` reshaped in C order (a view where the kind allows)."""

    @abstractmethod
    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        """``x`` with output axis ``i`` its axis ``perm[i]``."""

    @abstractmethod
    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        """``x`` reversed along ``axes`` (not empty)."""

    @abstractmethod
    def finish(self, x: Any) -> Any:
        """A contiguous array of ``x``'s values that shares no memory with the caller's input."""

    @abstractmethod
    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        """Zeros of ``shape`` of ``like``'s kind and dtype."""

    def check_out(self, x: Any, out: Any, shape: tuple[int, ...]) -> None:
        """Whether ``out`` may receive the mapping of ``x`` (of ``shape``); only numpy takes one."""
        raise MappingError(f"out= takes a numpy array for a numpy input, got {type(out).__name__} "
                           f"for {type(x).__name__}: leave out=None")

    def apply(self, x: Any, ops: tuple[Op, ...], nf: NormalForm | None = None, out: Any = None) -> Any:
        """``ops`` applied to ``x``: a new contiguous array of the same kind, or ``out`` filled.

        ``nf`` is the normal form of ``ops`` when known (for the fast paths); ``out`` has been
        accepted by :meth:`check_out`.
        """
        if out is not None:
            self.check_out(x, out, ())  # refuses: only numpy writes into an out array
        for op in ops:
            if isinstance(op, Reshape):
                x = self.reshape(x, op.shape)
            elif isinstance(op, Flip):
                x = self.flip(x, op.axes) if op.axes else x
            else:
                x = self.transpose(x, op.perm)
        return self.finish(x)


class NumpyOps(ArrayOps):
    framework = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def check(self, x: Any, what: str = "array") -> None:
        check_dtype(np.dtype(x.dtype), what)

    def reshape(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return x.reshape(shape)

    def transpose(self, x: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
        return x.transpose(perm)

    def flip(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        index = [slice(None)] * x.ndim
        for a in axes:
            index[a] = slice(None, None, -1)
        return x[tuple(index)]

    def finish(self, x: np.ndarray) -> np.ndarray:
        result = np.empty(x.shape, dtype=x.dtype)
        _copy.blocked_copy(result, x)
        return result

    def zeros(self, like: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=like.dtype)

    def check_out(self, x: Any, out: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(out, np.ndarray):
            super().check_out(x, out, shape)
        if tuple(out.shape) != shape or out.dtype != x.dtype:
            raise MappingError(f"out has shape={tuple(out.shape)} dtype={out.dtype}: expected shape={shape} "
                               f"dtype={x.dtype}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise MappingError("out is not a writeable C-contiguous array: pass np.empty(mapping.out_shape, dtype)")
        if np.shares_memory(x, out):
            raise MappingError("out overlaps the input array: a mapping cannot rearrange in place")

    def apply(self, x: np.ndarray, ops: tuple[Op, ...], nf: NormalForm | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
        if nf is not None and x.nbytes >= _copy.BLOCKED_MIN_BYTES and x.flags.c_contiguous:
            done = _copy.transpose_copy(x, nf, out)
            if done is not None:
                return done
        final = None
        if ops and isinstance(ops[-1], Reshape):  # copy the view before its last reshape: fewer, longer axes
            final, ops = ops[-1].shape, ops[:-1]
        view = x
        for op in ops:
            if isinstance(op, Reshape):
                view = self.reshape(view, op.shape)
            elif isinstance(op, Transpose):
                view = self.transpose(view, op.perm)
            elif op.axes:
                view = self.flip(view, op.axes)
        result = np.empty(view.shape, dtype=view.dtype) if out is None else out.reshape(view.shape)
        _copy.blocked_copy(result, view)
        return result.reshape(final or view.shape) if out is None else out


class TorchOps(ArrayOps):
    framework = "torch"

    def is_array(self, x: Any) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def check(self, x: Any, what: str = "array") -> None:
        if x.is_quantized or x.layout != sys.modules["torch"].strided or x.is_meta:
            kind = "quantized" if x.is_quantized else "meta" if x.is_meta else str(x.layout).removeprefix("torch.")
            raise MappingError(f"{what} is a {kind} torch tensor (dtype={x.dtype}), not a plain array: expected a dense tensor "
                               "with its values (call .dequantize() / .to_dense() first)")
        if x.dtype.is_complex:
            raise MappingError(f"{what} dtype={x.dtype} is not a real numeric type: expected float, bfloat16, integer or bool values")

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.permute(perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.flip(axes)

    def finish(self, x: Any) -> Any:
        return x.clone(memory_format=sys.modules["torch"].contiguous_format)  # never the caller's storage

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return like.new_zeros(shape)


class TensorflowOps(ArrayOps):
    framework = "tensorflow"

    def is_array(self, x: Any) -> bool:
        tf = sys.modules.get("tensorflow")
        return tf is not None and (isinstance(x, (tf.Tensor, tf.Variable)))

    def check(self, x: Any, what: str = "array") -> None:
        dtype = x.dtype
        if not (dtype.is_floating or dtype.is_integer or dtype.is_bool) or dtype.is_quantized:
            raise MappingError(f"{what} dtype={dtype.name} is not a real numeric type: expected float, bfloat16, integer or bool values")

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].reshape(x, shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].transpose(x, perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].reverse(x, axes)

    def finish(self, x: Any) -> Any:
        return sys.modules["tensorflow"].identity(x)

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["tensorflow"].zeros(shape, dtype=like.dtype)


class JaxOps(ArrayOps):
    framework = "jax"

    def is_array(self, x: Any) -> bool:
        jax = sys.modules.get("jax")
        return jax is not None and isinstance(x, jax.Array)

    def check(self, x: Any, what: str = "array") -> None:
        check_dtype(np.dtype(x.dtype), what)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.transpose(perm)

    def flip(self, x: Any, axes: tuple[int, ...]) -> Any:
        return sys.modules["jax.numpy"].flip(x, axes)

    def finish(self, x: Any) -> Any:
        return x  # jax arrays are immutable: sharing a buffer cannot change the caller's values

    def zeros(self, like: Any, shape: tuple[int, ...]) -> Any:
        return sys.modules["jax.numpy"].zeros(shape, dtype=like.dtype)


_REGISTRY: tuple[ArrayOps, ...] = (NumpyOps(), TorchOps(), TensorflowOps(), JaxOps())


def ops_for(x: Any) -> ArrayOps:
    """The :class:`ArrayOps` for ``x``'s kind, or a clear error."""
    for ops in _REGISTRY:
        if ops.is_array(x):
            return ops
    raise MappingError(
        f"array of type={type(x).__module__}.{type(x).__qualname__} is not supported: "
        "expected a numpy, torch, tensorflow or jax array"
    )


def framework_of(x: Any) -> str:
    return ops_for(x).framework


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


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

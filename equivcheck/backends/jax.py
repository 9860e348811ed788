"""JAX: ``jnp`` reshape + matmul dense, ``lax.conv_general_dilated`` convolutions.

The dimension numbers come from the spec: the map is ``NCHW`` or ``NHWC`` as the spec's data
format says, and a plain convolution's kernel is passed in its stored layout (``"OIHW"``,
``"HWIO"``, ``"OHWI"`` …) with that layout as the rhs spec — JAX reads any. A depthwise
kernel (``…IM``) becomes ``(out, 1, *k)`` with ``feature_group_count=in_channels``. A
transposed convolution is the equivalent forward one: ``lhs_dilation=stride``, the kernel
flipped with in/out exchanged per group, padding ``d·(k−1) − pad``. float64 runs under
``jax.enable_x64`` for the call only.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck.backends.base import (
    ArrayLayer,
    Backend,
    check_input,
    dense_kernel,
    flatten_permutation,
    kernel_layout_mapping,
    np_dtype,
)
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, DenseSpec, LayerSpec


def dimension_numbers(spec: ConvSpec) -> tuple[str, str, str]:
    """``(lhs, rhs, out)`` specs for ``lax.conv_general_dilated`` realising ``spec`` directly.

    A depthwise or transposed spec is first turned into ``OI…`` form (see :class:`JaxLayer`).
    """
    letters = spec.letters
    io = ("NC" + letters) if spec.data_format == CHANNELS_FIRST else ("N" + letters + "C")
    direct = not spec.transposed and not spec.is_depthwise_layout
    return io, spec.kernel_layout if direct else "OI" + letters, io


class JaxLayer(ArrayLayer):
    """``spec`` as jnp / lax calls on device arrays."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        import jax
        import jax.numpy as jnp

        self._jax, self._jnp = jax, jnp

    def _x64(self) -> Any:
        return self._jax.enable_x64(True) if self.dtype == "float64" else contextlib.nullcontext()

    def _rhs(self) -> np.ndarray:
        """The kernel as the rhs of ``conv_general_dilated``, in the layout :func:`dimension_numbers` names."""
        spec, k = self.spec, self.kernel
        if not spec.transposed and not spec.is_depthwise_layout:
            if spec.op == "convolve":  # lax correlates: flip the spatial axes in place
                k = np.flip(k, axis=tuple(spec.kernel_layout.index(a) for a in spec.letters))
            return np.ascontiguousarray(k)
        m = kernel_layout_mapping(spec, ("IO" if spec.transposed else "OI") + spec.letters)
        k = m.apply(k)
        if spec.transposed:  # (I, O/g, *k) → forward kernel (O, I/g, *k), flipped
            g, r = spec.groups, spec.rank
            k = k.reshape(g, spec.in_channels // g, spec.out_channels // g, *spec.kernel_size)
            k = np.swapaxes(k, 1, 2).reshape(spec.out_channels, spec.in_channels // g, *spec.kernel_size)
            k = np.flip(k, axis=tuple(range(2, 2 + r)))
        return np.ascontiguousarray(k)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        spec, jnp = self.spec, self._jnp
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(spec, x)
        if isinstance(spec, DenseSpec):
            weight = dense_kernel(spec, self.kernel, "IO")
        else:
            weight = self._rhs()
        with self._x64():
            y = _compiled(spec)(jnp.asarray(x), jnp.asarray(weight), None if self.bias is None else jnp.asarray(self.bias))
            return np.asarray(y)


@lru_cache(maxsize=256)
def _compiled(spec: LayerSpec) -> Any:
    """The jitted forward of ``spec``: one XLA computation, compiled once per input shape and dtype."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if isinstance(spec, DenseSpec):
        perm = flatten_permutation(spec)

        def dense(x: Any, w: Any, b: Any) -> Any:
            if perm is not None:
                x = jnp.transpose(x, perm)
            y = jnp.matmul(x.reshape(x.shape[0], -1), w)
            return y if b is None else y + b

        return jax.jit(dense)

    dn = dimension_numbers(spec)
    if spec.transposed:
        pads = [
            (d * (k - 1) - lo, d * (k - 1) - hi + op)
            for (lo, hi), d, k, op in zip(spec.pads(), spec.dilation, spec.kernel_size, spec.output_padding)
        ]
        conv_args = dict(window_strides=(1,) * spec.rank, padding=pads, lhs_dilation=spec.stride)
    else:
        conv_args = dict(window_strides=spec.stride, padding=list(spec.pads()))
    bias_shape = (-1, *(1,) * spec.rank) if spec.data_format == CHANNELS_FIRST else (-1,)

    def conv(x: Any, w: Any, b: Any) -> Any:
        y = lax.conv_general_dilated(x, w, rhs_dilation=spec.dilation, dimension_numbers=dn,
                                     feature_group_count=spec.groups, **conv_args)
        return y if b is None else y + b.reshape(bias_shape)

    return jax.jit(conv)


class JaxBackend(Backend):
    name = "jax"
    module = "jax"

    def build(self, spec: LayerSpec, dtype: str = "float32") -> JaxLayer:
        self._check(spec, dtype)
        self.load()
        return JaxLayer(spec, dtype)

    def tensor(self, a: np.ndarray, dtype: str) -> Any:
        jax = self.load()
        with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
            return jax.numpy.asarray(np.asarray(a, dtype=np_dtype(dtype)))


__all__ = ["JaxBackend", "JaxLayer", "dimension_numbers"]

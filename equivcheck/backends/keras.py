"""Keras 3 on TensorFlow: ``Flatten(data_format)`` + ``Dense``, ``Conv1D/2D/3D``,
``Conv1D/2D/3DTranspose``, ``DepthwiseConv1D/2D``, in either data format.

The layers take the spec's ``data_format`` as is. Keras kernels are ``(*k, in/groups, out)``
for a convolution, ``(*k, out, in)`` for a transposed one and ``(*k, in, multiplier)`` for a
depthwise one; Keras ``Flatten`` always linearises channels last (it transposes a
channels-first map first). What Keras has no argument for is done around the layer with
``keras.ops``: a flatten order other than Keras's is an explicit transpose before
``Flatten``, integer padding is ``ops.pad`` before a ``"valid"`` conv, and a transposed
conv's padding is a crop of its ``"valid"`` output. A spec whose groups equal its input
channels (rank 1–2) is a ``DepthwiseConv``; other groups use ``Conv(groups=)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.backends._tensorflow import (
    import_keras,
    import_tensorflow,
    installed,
    keras_backend_name,
    tensor_in_place,
    tf_tensor,
)
from equivcheck.backends.base import (
    Backend,
    Layer,
    check_input,
    dense_kernel,
    flatten_permutation,
    native_weights,
    np_dtype,
    stored_kernel,
)
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec

# Kernel layouts of the Keras layers, with S standing for the spatial letters.
KERNEL_LAYOUTS = {"conv": "SIO", "conv_transpose": "SOI", "depthwise": "SIM"}


def layer_kind(spec: ConvSpec) -> str:
    """Which Keras layer family realises ``spec``: conv, conv_transpose or depthwise."""
    if spec.transposed:
        return "conv_transpose"
    if spec.groups > 1 and spec.groups == spec.in_channels and spec.rank <= 2:
        return "depthwise"  # Keras has no DepthwiseConv3D: rank 3 is Conv3D(groups=in_channels)
    return "conv"


def _spatial_axes(spec: LayerSpec, ndim: int) -> list[int]:
    return list(range(2, ndim)) if spec.data_format == CHANNELS_FIRST else list(range(1, ndim - 1))


def _layer_output_spatial(spec: ConvSpec) -> tuple[int, ...]:
    """The Keras layer's own output size (a transposed conv's before the crop of the spec's padding)."""
    if not spec.transposed:
        return spec.output_spatial
    return tuple(
        (n - 1) * s + d * (k - 1) + 1 + op
        for n, s, d, k, op in zip(spec.spatial, spec.stride, spec.dilation, spec.kernel_size, spec.output_padding)
    )


# Weights are always set right after building: skip the random initialisation (100M draws for fc6).
_NO_INIT = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}


class KerasLayer(Layer):
    """Keras layers realising ``spec``, with the explicit transposes, pads and crops around them."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        keras = import_keras()
        self._ops = keras.ops
        L = keras.layers
        self._perm: tuple[int, ...] | None = None
        self._pad: list[list[int]] | None = None
        self._crop: tuple[slice, ...] | None = None
        if isinstance(spec, DenseSpec):
            keras_order = spec.map_letters[1:] + "C"  # Flatten's order for either data format
            self._perm = flatten_permutation(spec, native=keras_order)
            self._layout = "IO"  # Dense kernels are (in, out)
            fmt = spec.data_format if self._perm is None else CHANNELS_LAST  # a plain row-major flatten
            self.flatten = L.Flatten(data_format=fmt, dtype=dtype)
            self.layer = L.Dense(spec.units, use_bias=spec.bias, dtype=dtype, **_NO_INIT)
            self.layer.build((None, spec.in_features))
            return
        self.flatten = None
        r, kind = spec.rank, layer_kind(spec)
        self._layout = KERNEL_LAYOUTS[kind].replace("S", spec.letters)
        common: dict[str, Any] = dict(
            kernel_size=spec.kernel_size, strides=spec.stride, dilation_rate=spec.dilation,
            data_format=spec.data_format, use_bias=spec.bias, dtype=dtype,
        )
        init = {"depthwise_initializer": "zeros", "bias_initializer": "zeros"} if layer_kind(spec) == "depthwise" else _NO_INIT
        pads = spec.pads()
        in_spatial = list(spec.spatial)
        if kind == "conv_transpose":
            cls = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)[r - 1]
            out = spec.output_spatial
            self._crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(pads, out))
            layer = cls(spec.out_channels, padding="valid", output_padding=spec.output_padding, **common, **init)
        else:
            if spec.padding == "same":
                padding = "same"
            else:
                padding = "valid"
                if any(lo or hi for lo, hi in pads):
                    self._pad = [list(p) for p in pads]
                    in_spatial = [n + lo + hi for n, (lo, hi) in zip(in_spatial, pads)]
            if kind == "depthwise":
                cls = (L.DepthwiseConv1D, L.DepthwiseConv2D)[r - 1]
                layer = cls(depth_multiplier=spec.out_channels // spec.in_channels, padding=padding, **common, **init)
            else:
                cls = (L.Conv1D, L.Conv2D, L.Conv3D)[r - 1]
                layer = cls(spec.out_channels, padding=padding, groups=spec.groups, **common, **init)
        c = spec.in_channels
        shape = (c, *in_spatial) if spec.data_format == CHANNELS_FIRST else (*in_spatial, c)
        layer.build((None, *shape))
        self.layer = layer

    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        spec = self.spec
        native = native_weights(spec, kernel, bias, self._layout)
        dt = np_dtype(self.dtype)
        values = [native] + ([] if bias is None else [np.asarray(bias)])
        for variable, value in zip(self.layer.weights, values, strict=True):
            value = value.astype(dt, copy=False)  # assign() copies a numpy array itself
            shared = None if copy else tensor_in_place(value)
            variable.assign(value if shared is None else shared)

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        weights = self.layer.get_weights()
        native, bias = weights[0], (weights[1] if len(weights) > 1 else None)
        spec = self.spec
        kernel = dense_kernel(spec, native, "IO") if isinstance(spec, DenseSpec) else stored_kernel(spec, native, self._layout)
        return kernel, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        ops, spec = self._ops, self.spec
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(spec, x)
        t = ops.convert_to_tensor(x)
        if self._perm is not None:
            t = ops.transpose(t, self._perm)
        if self.flatten is not None:
            t = self.flatten(t)
        if self._pad is not None:
            widths = [[0, 0] for _ in range(x.ndim)]
            for axis, p in zip(_spatial_axes(spec, x.ndim), self._pad):
                widths[axis] = p
            t = ops.pad(t, widths)
        y = self.layer(t)
        if self._crop is not None:
            index = [slice(None)] * x.ndim
            for axis, s in zip(_spatial_axes(spec, x.ndim), self._crop):
                index[axis] = s
            y = y[tuple(index)]
        try:  # a TensorFlow (or JAX) array: its buffer, no copy
            out = np.asarray(y)
        except (TypeError, ValueError, RuntimeError):
            out = np.asarray(ops.convert_to_numpy(y))
        return out.astype(np_dtype(self.dtype), copy=False)


class KerasBackend(Backend):
    name = "keras"
    module = "keras"

    def available(self) -> bool:
        return installed("keras", "tensorflow") and keras_backend_name() == "tensorflow"

    def _import(self) -> Any:
        return import_keras()

    def tensor(self, a: np.ndarray, dtype: str) -> Any:
        return tf_tensor(a, dtype)  # Keras 3 on TensorFlow: its layers hold tf tensors

    def version(self) -> str:
        keras = self.load()
        return f"{keras.__version__} (tensorflow {import_tensorflow().__version__})"

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        """What Keras's layer API refuses, on every machine (the kernels this CPU has are probed)."""
        why = super().unsupported(spec, dtype)
        if why or isinstance(spec, DenseSpec):
            return why
        kind, r = layer_kind(spec), spec.rank
        dilated, strided = any(d > 1 for d in spec.dilation), any(s > 1 for s in spec.stride)
        if kind == "conv_transpose":
            if spec.groups > 1:
                return f"Keras Conv{r}DTranspose has no groups argument (groups={spec.groups})"
            if any(o >= s for o, s in zip(spec.output_padding, spec.stride)):
                return f"Keras Conv{r}DTranspose needs output_padding < strides (output_padding={spec.output_padding}, strides={spec.stride})"
        if kind != "depthwise" and dilated and strided:
            return f"Keras Conv{r}D{'Transpose' if spec.transposed else ''} refuses strides > 1 with dilation_rate > 1"
        if spec.bias and spec.data_format == CHANNELS_FIRST and _layer_output_spatial(spec)[-1] == spec.out_channels:
            return (f"Keras 3 on TensorFlow adds a channels_first bias along the last axis when the output's last "
                    f"spatial size equals the channel count ({spec.out_channels}): keras.ops.add takes it for NHWC")
        return None

    def build(self, spec: LayerSpec, dtype: str = "float32") -> KerasLayer:
        self._check(spec, dtype)
        self.load()
        return KerasLayer(spec, dtype)

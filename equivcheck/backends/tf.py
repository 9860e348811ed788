"""TensorFlow's raw ops: ``tf.reshape`` + ``tf.matmul`` dense, ``tf.nn.conv1d/conv2d/conv3d``,
``tf.nn.conv_transpose`` and ``tf.nn.depthwise_conv2d``, bias by ``tf.nn.bias_add``.

Filters are ``(*k, in/groups, out)``, transposed ones ``(*k, out, in)`` (grouped:
``(*k, out/groups, in)``, the filter of the grouped convolution it is the gradient of),
depthwise ones ``(*k, in, multiplier)``. A channels-first map is transposed to ``NHWC``
around the op: TF's CPU kernels take ``NCHW`` only where oneDNN runs them, which depends on
the CPU, and the result is the same. Padding, ``"same"`` included, is ``tf.pad`` before a
``"VALID"`` op: TF's own ``"SAME"`` is wrong in its Eigen ``Conv3D`` when a stride makes the
padding negative (:func:`same_pads_negative`). A transposed conv runs ``"VALID"`` and its
padding is cropped off. Which of these ops run in which dtype on this CPU is probed
(:mod:`equivcheck.backends.probe`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.backends._tensorflow import import_tensorflow, installed, tensor_in_place, tf_tensor
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
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, DenseSpec, LayerSpec

FILTER_LAYOUTS = {"conv": "SIO", "conv_transpose": "SOI", "depthwise": "SIM"}


def op_kind(spec: ConvSpec) -> str:
    """Which tf.nn op realises ``spec``: conv, conv_transpose or depthwise (``depthwise_conv2d``)."""
    if spec.transposed:
        return "conv_transpose"
    if spec.rank == 2 and spec.groups > 1 and spec.groups == spec.in_channels:
        return "depthwise"
    return "conv"


class TFLayer(Layer):
    """``spec`` as a short sequence of tf ops on constant weights."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        self._tf = tf = import_tensorflow()
        self._tdtype = getattr(tf, dtype)
        self.kernel: Any = None
        self.bias: Any = None
        if isinstance(spec, DenseSpec):
            self._perm = flatten_permutation(spec)
            self._layout = "IO"  # tf.matmul(x, w): (in, out)
            return
        self._kind = op_kind(spec)
        self._layout = FILTER_LAYOUTS[self._kind].replace("S", spec.letters)
        self._format = "N" + spec.letters + "C"

    # -- weights ---------------------------------------------------------------------------
    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        spec, tf = self.spec, self._tf
        native = native_weights(spec, kernel, bias, self._layout)
        dt = np_dtype(self.dtype)
        native = native.astype(dt, copy=False)
        shared = None if copy else tensor_in_place(native)
        self.kernel = tf.constant(native, dtype=self._tdtype) if shared is None else shared
        self.bias = None if bias is None else tf.constant(np.asarray(bias).astype(dt), dtype=self._tdtype)

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        native = self.kernel.numpy()
        spec = self.spec
        kernel = dense_kernel(spec, native, "IO") if isinstance(spec, DenseSpec) else stored_kernel(spec, native, self._layout)
        return kernel, None if self.bias is None else self.bias.numpy()

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        tf, spec = self._tf, self.spec
        x = np.asarray(x, dtype=np_dtype(self.dtype))
        check_input(spec, x)
        t = tf.constant(x, dtype=self._tdtype)
        if isinstance(spec, DenseSpec):
            if self._perm is not None:
                t = tf.transpose(t, self._perm)
            y = tf.matmul(tf.reshape(t, (x.shape[0], -1)), self.kernel)
            if self.bias is not None:
                y = tf.nn.bias_add(y, self.bias)
            return y.numpy()
        around = spec.data_format == CHANNELS_FIRST
        if around:
            t = tf.transpose(t, (0, *range(2, x.ndim), 1))
        y = self._transposed(t) if self._kind == "conv_transpose" else self._conv(t)
        if self.bias is not None:
            y = tf.nn.bias_add(y, self.bias)
        if around:
            y = tf.transpose(y, (0, x.ndim - 1, *range(1, x.ndim - 1)))
        return y.numpy()

    @staticmethod
    def _full(values: tuple[int, ...]) -> list[int]:
        """Per-spatial-axis values spread over all NHWC axes (1 on batch and channels), as tf.nn wants."""
        return [1, *values, 1]

    def _conv(self, t: Any) -> Any:
        tf, spec = self._tf, self.spec
        padding = "VALID"  # never TF's "SAME": its float64/float16 Conv3D gets some strided cases wrong
        if any(lo or hi for lo, hi in spec.pads()):
            t = tf.pad(t, [[0, 0], *(list(p) for p in spec.pads()), [0, 0]])
        if self._kind == "depthwise":
            return tf.nn.depthwise_conv2d(
                t, self.kernel, strides=self._full(spec.stride), padding=padding,
                data_format=self._format, dilations=spec.dilation,
            )
        op = (tf.nn.conv1d, tf.nn.conv2d, tf.nn.conv3d)[spec.rank - 1]
        if spec.rank == 3:
            return op(t, self.kernel, strides=self._full(spec.stride), padding=padding,
                      data_format=self._format, dilations=self._full(spec.dilation))
        return op(t, self.kernel, spec.stride if spec.rank == 2 else spec.stride[0], padding=padding,
                  data_format=self._format, dilations=spec.dilation if spec.rank == 2 else spec.dilation[0])

    def _transposed(self, t: Any) -> Any:
        """``VALID`` transposed conv (channels last), then output padding and the crop of the spec's pads."""
        tf, spec = self._tf, self.spec
        full = [(n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(spec.spatial, spec.stride, spec.dilation, spec.kernel_size)]
        out_shape = (int(t.shape[0]), *full, spec.out_channels)
        y = tf.nn.conv_transpose(t, self.kernel, out_shape, strides=spec.stride, padding="VALID",
                                 data_format=self._format, dilations=list(spec.dilation))
        if any(spec.output_padding):  # positions no input reaches: zeros (the bias comes later)
            y = tf.pad(y, [[0, 0], *([0, op] for op in spec.output_padding), [0, 0]])
        crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(spec.pads(), spec.output_spatial))
        return y[(slice(None), *crop, slice(None))]


def same_pads_negative(spec: ConvSpec) -> bool:
    """Whether TF's Eigen ``Conv3D`` (float64/float16) computes ``padding="SAME"`` wrongly for ``spec``.

    It takes the unclamped total pad ``(ceil(n/s) − 1)·s + k − n``; at −2 or less its half is
    a negative pad that shifts the windows.
    """
    return spec.padding == "same" and any(
        (-(-n // s) - 1) * s + d * (k - 1) + 1 - n <= -2
        for n, k, s, d in zip(spec.spatial, spec.kernel_size, spec.stride, spec.dilation)
    )


class TFBackend(Backend):
    name = "tf"
    module = "tensorflow"

    def available(self) -> bool:
        return installed("tensorflow")

    def _import(self) -> Any:
        return import_tensorflow()

    def tensor(self, a: np.ndarray, dtype: str) -> Any:
        return tf_tensor(a, dtype)

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        why = super().unsupported(spec, dtype)
        if why or isinstance(spec, DenseSpec):
            return why
        if op_kind(spec) == "depthwise" and any(d > 1 for d in spec.dilation) and any(st > 1 for st in spec.stride):
            return "tf.nn.depthwise_conv2d needs strides 1 when dilations > 1 (it warns and computes another shape)"
        return None

    def build(self, spec: LayerSpec, dtype: str = "float32") -> TFLayer:
        self._check(spec, dtype)
        self.load()
        layer = TFLayer(spec, dtype)
        dt = np_dtype(dtype)
        layer.set_weights(np.zeros(spec.kernel_shape, dt), np.zeros(spec.bias_shape, dt) if spec.bias else None)
        return layer

"""TensorFlow Lite: one builtin op per layer, converted in memory, run by the TFLite interpreter.

The op is a ``tf.function`` of ``tf.raw_ops`` with constant weights, converted by
``tf.lite.TFLiteConverter.from_concrete_functions``: ``FULLY_CONNECTED`` (weights (out, in)),
``CONV_2D`` (filter OHWI, groups through its input depth), ``DEPTHWISE_CONV_2D`` (filter
``(1, kh, kw, C·M)``), ``TRANSPOSE_CONV`` (OHWI), ``CONV_3D`` / ``CONV_3D_TRANSPOSE`` (DHWIO /
DHWOI). TFLite maps are NHWC and its ops pad only "SAME" or "VALID": what the spec asks beyond
that is done around the model in numpy (channels-first transposes, the flatten, explicit pads,
a rank-1 map as a 1×W image, a transposed conv's crop).

Converting takes 0.1–0.4 s (70 s and 9 GB for VGG's fc6), so a spec converts once per batch
size, shared by its layers, with probe weights (distinct float32 numbers from 1.0 up): where the
converter put each of them in the flatbuffer says where each weight lives, and ``set_weights``
then writes the real ones into a copy of those bytes (where it cannot tell, each new set of
weights is converted). Runs on ``ai_edge_litert``'s interpreter where installed, else
``tf.lite.Interpreter``, with its default XNNPACK delegate, on one thread. float32 only.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck.backends._tensorflow import import_tensorflow, installed
from equivcheck.backends.base import (
    Backend,
    Layer,
    check_input,
    dense_kernel,
    flatten_permutation,
    native_weights,
    stored_kernel,
)
from equivcheck.errors import SpecError
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, DenseSpec, LayerSpec

# TensorFlow's kernel layouts for the ops the converter maps, S for the spatial letters.
TF_LAYOUTS = {"conv": "SIO", "depthwise": "SIM", "conv_transpose": "SOI"}
# Probe weights are the float32 numbers from 1.0 up, one ulp apart: distinct and finite for 2**30 of them.
_PROBE_BASE = 0x3F800000
_MAX_PROBE = 1 << 30


def layer_kind(spec: LayerSpec) -> str:
    """dense, conv, depthwise or conv_transpose: which TFLite op family realises ``spec``."""
    if isinstance(spec, DenseSpec):
        return "dense"
    if spec.transposed:
        return "conv_transpose"
    if spec.groups > 1 and spec.groups == spec.in_channels and spec.rank <= 2:
        return "depthwise"
    return "conv"


def native_shape(spec: ConvSpec, layout: str) -> tuple[int, ...]:
    """The kernel's shape in TensorFlow ``layout`` (letters O, I, M and spatial)."""
    g = spec.groups
    sizes = dict(zip(spec.letters, spec.kernel_size))
    if "M" in layout:
        sizes.update(I=spec.in_channels, M=spec.out_channels // spec.in_channels)
    elif spec.transposed:
        sizes.update(I=spec.in_channels, O=spec.out_channels // g)
    else:
        sizes.update(I=spec.in_channels // g, O=spec.out_channels)
    return tuple(sizes[a] for a in layout)


def interpreter_class() -> Any:
    """``ai_edge_litert.interpreter.Interpreter``, else TensorFlow's own (deprecated) one."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = import_tensorflow().lite.Interpreter
    return Interpreter


class _Geometry:
    """The spec as TFLite sees it: rank ≥ 2, NHWC, pads done before, crop after."""

    def __init__(self, spec: ConvSpec) -> None:
        lift = spec.rank == 1  # TFLite has no 1-D convolution: a 1×W image
        pre = (1,) if lift else ()
        self.lift = lift
        self.stride = pre + spec.stride
        self.dilation = pre + spec.dilation
        self.kernel_size = pre + spec.kernel_size
        pads = ((0, 0),) * lift + spec.pads()
        self.same = spec.padding == "same"
        self.pads = None if self.same or not any(lo or hi for lo, hi in pads) or spec.transposed else pads
        self.spatial = tuple(n + lo + hi for n, (lo, hi) in zip(pre + spec.spatial, pads)) if self.pads else pre + spec.spatial
        self.crop = None
        if spec.transposed:  # a "VALID" transposed conv, then the spec's padding cropped away
            self.full = tuple((n - 1) * s + d * (k - 1) + 1 + op for n, s, d, k, op in zip(
                pre + spec.spatial, self.stride, self.dilation, self.kernel_size, pre + spec.output_padding))
            self.crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(pads, pre + spec.output_spatial))


def _tf_function(spec: LayerSpec, geo: _Geometry | None, batch: int, kernel: np.ndarray, bias: np.ndarray | None) -> Any:
    """A traced ``tf.function`` of the layer's one op on its TFLite-side input, weights constant."""
    tf = import_tensorflow()
    w = tf.constant(kernel)
    b = None if bias is None else tf.constant(bias)
    if isinstance(spec, DenseSpec):
        shape = [batch, spec.in_features]

        def op(x: Any) -> Any:
            return tf.matmul(x, w)
    else:
        assert geo is not None
        kind, r = layer_kind(spec), len(geo.kernel_size)
        strides, dilations = [1, *geo.stride, 1], [1, *geo.dilation, 1]
        padding = "SAME" if geo.same else "VALID"
        shape = [batch, *((1,) * geo.lift + spec.spatial if spec.transposed else geo.spatial), spec.in_channels]

        def op(x: Any) -> Any:
            if kind == "depthwise":
                return tf.raw_ops.DepthwiseConv2dNative(input=x, filter=w, strides=strides, padding=padding, dilations=dilations)
            if kind == "conv":
                conv = tf.raw_ops.Conv2D if r == 2 else tf.raw_ops.Conv3D
                return conv(input=x, filter=w, strides=strides, padding=padding, dilations=dilations)
            sizes = [batch, *geo.full, spec.out_channels]
            if r == 2:
                return tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=w, out_backprop=x, strides=strides,
                                                      padding="VALID", dilations=dilations)
            return tf.raw_ops.Conv3DBackpropInputV2(input_sizes=sizes, filter=w, out_backprop=x, strides=strides,
                                                    padding="VALID", dilations=dilations)

    def layer(x: Any) -> Any:
        y = op(x)
        return y if b is None else tf.nn.bias_add(y, b)

    return tf.function(layer, input_signature=[tf.TensorSpec(shape, tf.float32)])


def convert(function: Any) -> bytes:
    """The TFLite flatbuffer of a traced ``tf.function`` (builtin ops only)."""
    tf = import_tensorflow()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], function)
    try:
        return converter.convert()
    except Exception as exc:  # ConverterError: an op without a builtin TFLite kernel
        lines = [s for s in str(exc).splitlines() if "TF Select ops" in s or "error:" in s]
        raise SpecError(f"TFLite conversion failed: {(lines or [type(exc).__name__])[0].strip()}") from None


def interpreter(model: bytes) -> Any:
    """An allocated one-thread interpreter of ``model``."""
    it = interpreter_class()(model_content=model, num_threads=1)
    it.allocate_tensors()
    return it


class _Template:
    """A converted model of one batch size and where each weight lives in its bytes."""

    def __init__(self, model: bytes, places: dict[str, tuple[int, np.ndarray]] | None) -> None:
        self.model = model
        self.places = places  # name -> (byte offset, flat index of each stored value); None: convert each time


def _locate(model: bytes, probes: dict[str, np.ndarray]) -> dict[str, tuple[int, np.ndarray]] | None:
    """Where the converter stored each probe array, as (byte offset, which probe value sits at each place)."""
    it = interpreter(model)
    io = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    places: dict[str, tuple[int, np.ndarray]] = {}
    for detail in it.get_tensor_details():
        if detail["index"] in io or detail["dtype"] != np.float32:
            continue
        try:
            values = np.asarray(it.get_tensor(detail["index"]))
        except ValueError:  # an intermediate tensor with no data
            continue
        for name, probe in probes.items():
            if values.size != probe.size or name in places:
                continue
            index = values.ravel().view(np.uint32).astype(np.int64) - int(probe.ravel()[:1].view(np.uint32)[0])
            if index.min() != 0 or index.max() != probe.size - 1 or np.bincount(index).max() != 1:
                continue  # not a permutation of this probe
            raw = values.astype("<f4").tobytes()
            offset = model.find(raw)
            if offset < 0 or model.find(raw, offset + 1) >= 0:
                return None
            index.setflags(write=False)  # shared by the layers of one spec
            places[name] = (offset, index)
    return places if len(places) == len(probes) else None


def _probe_template(spec: LayerSpec, batch: int) -> _Template:
    """Convert ``spec`` for ``batch`` samples with probe weights and locate them in the flatbuffer."""
    geo = None if isinstance(spec, DenseSpec) else _Geometry(spec)
    shape = (spec.in_features, spec.units) if isinstance(spec, DenseSpec) else native_shape(
        spec, TF_LAYOUTS[layer_kind(spec)].replace("S", spec.letters))
    k = math.prod(shape)
    bits = np.arange(_PROBE_BASE, _PROBE_BASE + k + (spec.out_channels if spec.bias else 0), dtype=np.uint32).view(np.float32)
    probe_k, probe_b = bits[:k].reshape(shape), bits[k:] if spec.bias else None
    model = convert(_tf_function(spec, geo, batch, probe_k[None] if geo and geo.lift else probe_k, probe_b))
    probes = {"kernel": probe_k} | ({} if probe_b is None else {"bias": probe_b})
    return _Template(model, _locate(model, probes))


# Layers with at most this many weights share their converted templates (per spec and batch size).
_CACHE_MAX_WEIGHTS = 1 << 20
_shared_template = lru_cache(maxsize=128)(_probe_template)
_last_large_template = lru_cache(maxsize=1)(_probe_template)  # fc6's takes a minute and 9 GB to convert


class TFLiteLayer(Layer):
    """A converted single-op TFLite model of ``spec`` and its interpreter."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        import_tensorflow()
        self.kind = layer_kind(spec)
        self._geo = None if isinstance(spec, DenseSpec) else _Geometry(spec)
        if isinstance(spec, ConvSpec):
            self._layout = TF_LAYOUTS[self.kind].replace("S", spec.letters)
            self.native_shape: tuple[int, ...] = native_shape(spec, self._layout)
        else:
            self._layout = "IO"  # the converter's graph multiplies by an (in, out) kernel
            self.native_shape = (spec.in_features, spec.units)
        self.kernel = np.zeros(self.native_shape, np.float32)  # TensorFlow's layout (before the converter's)
        self.bias = np.zeros(spec.bias_shape, np.float32) if spec.bias else None
        self._templates: dict[int, _Template] = {}
        self._interpreters: dict[int, Any] = {}

    # -- weights ------------------------------------------------------------------------
    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        spec = self.spec
        native = native_weights(spec, kernel, bias, self._layout)
        self.kernel = np.array(native, dtype=np.float32)
        self.bias = None if bias is None else np.array(bias, dtype=np.float32)
        self._interpreters.clear()

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        spec = self.spec
        if isinstance(spec, DenseSpec):
            kernel = dense_kernel(spec, self.kernel, "IO")
        else:
            kernel = stored_kernel(spec, self.kernel, self._layout)
        return np.ascontiguousarray(kernel), None if self.bias is None else self.bias.copy()

    def _tf_kernel(self, kernel: np.ndarray) -> np.ndarray:  # a rank-1 kernel as a 1×W one
        return kernel[None] if self._geo is not None and self._geo.lift else kernel

    def _template(self, batch: int) -> _Template:
        if batch not in self._templates:
            k = math.prod(self.native_shape)
            b = 0 if self.bias is None else self.bias.size
            if k + b >= _MAX_PROBE:
                self._templates[batch] = _Template(b"", None)
            else:
                shared = _shared_template if k + b <= _CACHE_MAX_WEIGHTS else _last_large_template
                self._templates[batch] = shared(self.spec, batch)
        return self._templates[batch]

    def model(self, batch: int) -> bytes:
        """The TFLite flatbuffer of this layer for ``batch`` samples, with the current weights."""
        template = self._template(batch)
        if template.places is None:
            return convert(_tf_function(self.spec, self._geo, batch, self._tf_kernel(self.kernel), self.bias))
        model = bytearray(template.model)
        for name, (offset, index) in template.places.items():
            values = (self.kernel if name == "kernel" else self.bias).ravel()[index].astype("<f4").tobytes()
            model[offset:offset + len(values)] = values
        return bytes(model)

    # -- forward ------------------------------------------------------------------------
    def to_native(self, x: np.ndarray) -> np.ndarray:
        """A batch in the spec's layout → the model's input: flattened, or NHWC, lifted and padded."""
        spec, geo = self.spec, self._geo
        if isinstance(spec, DenseSpec):
            perm = flatten_permutation(spec)
            return np.ascontiguousarray(x if perm is None else x.transpose(perm)).reshape(len(x), -1)
        assert geo is not None
        if spec.data_format == CHANNELS_FIRST:
            x = np.moveaxis(x, 1, -1)
        if geo.lift:
            x = x[:, None]
        if geo.pads:
            x = np.pad(x, ((0, 0), *geo.pads, (0, 0)))
        return np.ascontiguousarray(x)

    def from_native(self, y: np.ndarray) -> np.ndarray:
        """The model's output → the spec's layout (a transposed conv's padding cropped)."""
        spec, geo = self.spec, self._geo
        if geo is not None:
            if geo.crop is not None:
                y = y[(slice(None), *geo.crop)]
            if geo.lift:
                y = y[:, 0]
            if spec.data_format == CHANNELS_FIRST:
                y = np.moveaxis(y, -1, 1)
        return np.ascontiguousarray(y)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        check_input(self.spec, x)
        batch = len(x)
        if batch not in self._interpreters:
            self._interpreters[batch] = interpreter(self.model(batch))
        it = self._interpreters[batch]
        it.set_tensor(it.get_input_details()[0]["index"], self.to_native(x))
        it.invoke()
        return self.from_native(it.get_tensor(it.get_output_details()[0]["index"]))


class TFLiteBackend(Backend):
    name = "tflite"
    module = "tensorflow"
    dtypes = ("float32",)

    def available(self) -> bool:
        return installed("tensorflow")

    def _import(self) -> Any:
        return import_tensorflow()

    def version(self) -> str:
        tf = self.load()
        try:
            import ai_edge_litert

            runtime = f"ai_edge_litert {getattr(ai_edge_litert, '__version__', '?')}"
        except ImportError:
            runtime = "tf.lite.Interpreter"
        return f"{tf.__version__} converter, {runtime} (XNNPACK CPU)"

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        if dtype not in self.dtypes:
            return f"TFLite's builtin CPU kernels run float layers in float32 only (dtype={dtype})"
        if not isinstance(spec, ConvSpec):
            return None
        if spec.transposed and spec.groups > 1:
            return f"TFLite's transposed convolutions have no groups (groups={spec.groups})"
        if spec.transposed and spec.rank < 3 and any(d > 1 for d in spec.dilation):
            return f"TFLite TRANSPOSE_CONV has no dilation (dilation={spec.dilation})"
        if spec.transposed and any(o >= s for o, s in zip(spec.output_padding, spec.stride)):
            return f"TFLite needs output_padding < stride (output_padding={spec.output_padding}, stride={spec.stride})"
        if spec.rank == 3 and spec.groups > 1 and not spec.transposed:
            return f"TFLite CONV_3D has no groups (groups={spec.groups})"
        return None

    def build(self, spec: LayerSpec, dtype: str = "float32") -> TFLiteLayer:
        self._check(spec, dtype)
        self.load()
        return TFLiteLayer(spec, dtype)

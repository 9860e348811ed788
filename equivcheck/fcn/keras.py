"""Keras 3 models: find the Flatten → Dense head, rebuild it as convolutions, split for verification.

The body (everything before the Flatten) is cloned layer by layer with the weights copied
and the spatial input sizes left open; the Flatten becomes an ``Identity`` of the same name;
the first Dense becomes a ConvND whose kernel covers the feature map and each later Dense a
1×1 conv, their kernels mapped by :func:`equivcheck.plan` from the ``keras:dense`` (or
``keras_cf:dense``) spec to the ``keras:conv`` one. Other head layers are kept; a softmax
over the last axis in a channels_first model becomes ``Softmax(axis=1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from equivcheck.fcn.head import Activation, Affine, Dense, Head, HeadError, check_activation, leaky_relu
from equivcheck.specs import CHANNELS_LAST

__all__ = ["KerasSplit", "analyze", "convolutionalize", "is_keras_model", "split"]

_RANKS = ("1D", "2D", "3D")
BODY_LAYERS = frozenset(
    {"InputLayer", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "BatchNormalization", "LayerNormalization",
     "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity", "Dense", "Rescaling",
     "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"}
    | {f"{kind}{r}" for r in _RANKS for kind in (
        "Conv", "SeparableConv", "DepthwiseConv", "MaxPooling", "AveragePooling", "ZeroPadding", "SpatialDropout")}
)
HEAD_PASS = frozenset({"Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity"})
HEAD_LAYERS = HEAD_PASS | {"Dense", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "BatchNormalization"}
_PADDED = tuple(f"ZeroPadding{r}" for r in _RANKS)
_STRIDED = tuple(f"{kind}{r}" for r in _RANKS for kind in (
    "Conv", "SeparableConv", "DepthwiseConv", "MaxPooling", "AveragePooling"))
_ACTIVATION_NAMES = {"swish": "silu", None: "linear"}


def is_keras_model(model: Any) -> bool:
    import sys

    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


def _keras() -> Any:
    import keras

    return keras


def _kind(layer: Any) -> str:
    return type(layer).__name__


@dataclass
class Analysis:
    """Where a Keras model's Flatten → Dense head starts and what it holds."""

    model: Any
    flatten: Any
    body: list[Any]  # layers before the Flatten (model.layers order)
    head: list[Any]  # layers after it, a chain
    data_format: str
    map_shape: tuple[int, ...]  # canonical (channels, *spatial)
    input_shape: tuple[int, ...]  # per sample, the model's own layout
    dtype: str

    @property
    def preset(self) -> str:
        return "keras" if self.data_format == CHANNELS_LAST else "keras_cf"

    @property
    def rank(self) -> int:
        return len(self.map_shape) - 1


def _producer(layer: Any) -> Any:
    try:
        tensor = layer.input
    except (AttributeError, ValueError) as exc:
        raise HeadError(f"layer {layer.name!r} ({_kind(layer)}) is used more than once or has several inputs: "
                        f"the head after the Flatten must be a simple chain ({exc})") from None
    if isinstance(tensor, (list, tuple)):
        raise HeadError(f"layer {layer.name!r} ({_kind(layer)}) has {len(tensor)} inputs: the head after the Flatten must be a chain")
    return tensor._keras_history.operation


def _activation_name(value: Any, layer: str) -> str:
    if isinstance(value, dict) or not (value is None or isinstance(value, str)):
        raise HeadError(f"activation={value!r} of layer {layer!r} is not a built-in Keras activation: expected e.g. 'relu' or 'softmax'")
    return check_activation(_ACTIVATION_NAMES.get(value, value), layer)


def analyze(model: Any) -> Analysis:
    """Locate the Flatten and check every layer can be kept or converted."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise HeadError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs: expected one of each")
    layers = list(model.layers)
    flattens = [i for i, layer in enumerate(layers) if _kind(layer) == "Flatten"]
    if len(flattens) > 1:
        raise HeadError(f"model {model.name!r} has {len(flattens)} Flatten layers: equivcheck converts a single Flatten → Dense head")
    if not flattens:
        bad = [layer for layer in layers if _kind(layer) not in BODY_LAYERS and not _kind(layer).startswith("Global")]
        if bad:
            raise HeadError(f"layer {bad[0].name!r} ({_kind(bad[0])}) cannot run on other input sizes as a convolution: "
                            "expected convolutions, pooling, activations, normalisation and a Flatten → Dense head")
        return Analysis(model, None, layers, [], CHANNELS_LAST, (), tuple(model.inputs[0].shape[1:]), _dtype(model))
    at = flattens[0]
    flatten = layers[at]
    body, head = layers[:at], layers[at + 1 :]
    for layer in body:
        if _kind(layer) not in BODY_LAYERS:
            raise HeadError(
                f"layer {layer.name!r} ({_kind(layer)}) before the Flatten is not convolutional: a sliding window needs "
                "a body of convolutions, pooling, activations and normalisation (no recurrent, reshaping or global layers)"
            )
    previous = flatten
    for layer in head:
        if _kind(layer) not in HEAD_LAYERS:
            raise HeadError(
                f"layer {layer.name!r} ({_kind(layer)}) after the Flatten cannot become a convolution: expected Dense, "
                "Dropout, Activation, ReLU, LeakyReLU, ELU, Softmax or BatchNormalization"
            )
        if _producer(layer) is not previous:
            raise HeadError(f"layer {layer.name!r} does not read the output of {previous.name!r}: the head after the Flatten must be a chain")
        previous = layer
    if not any(_kind(layer) == "Dense" for layer in head):
        raise HeadError(f"model {model.name!r} has no Dense after its Flatten: nothing to convolutionalize")
    if model.outputs[0] is not previous.output:
        raise HeadError(f"the model's output is not the last head layer {previous.name!r}: expected the head to end the model")
    data_format = flatten.get_config().get("data_format") or _keras().config.image_data_format()
    shape = tuple(int(s) for s in flatten.input.shape[1:])
    if len(shape) < 2 or any(s is None for s in shape):
        raise HeadError(f"the Flatten {flatten.name!r} reads shape={shape}: expected a feature map (channels plus 1-3 spatial axes)")
    if data_format == CHANNELS_LAST:
        map_shape = (shape[-1], *shape[:-1])
    else:
        map_shape = shape
    return Analysis(model, flatten, body, head, data_format, map_shape, tuple(model.inputs[0].shape[1:]), _dtype(model))


def _dtype(model: Any) -> str:
    policy = model.dtype_policy
    if policy.compute_dtype != policy.variable_dtype:
        raise HeadError(f"dtype policy={policy.name!r} computes in {policy.compute_dtype} but stores {policy.variable_dtype}: "
                        "mixed precision is not supported; use float32")
    return str(policy.compute_dtype)


# -- the head as numpy steps --------------------------------------------------------------
def head_of(a: Analysis) -> Head:
    """The framework-neutral :class:`Head` of an analysed model."""
    from equivcheck.presets import spec

    steps: list[Any] = []
    features = a.map_shape
    seen_dense = False
    for layer in a.head:
        kind, cfg = _kind(layer), layer.get_config()
        if kind in HEAD_PASS:
            continue
        if kind == "Dense":
            if seen_dense:
                s = spec(f"{a.preset}:dense", channels=features[0], units=layer.units, bias=layer.use_bias)
            else:
                s = spec(f"{a.preset}:dense", channels=features[0], spatial=features[1:], units=layer.units, bias=layer.use_bias)
            kernel = np.asarray(layer.kernel)
            bias = np.asarray(layer.bias) if layer.use_bias else None
            steps.append(Dense(layer.name, s, kernel, bias, _activation_name(cfg.get("activation"), layer.name)))
            features, seen_dense = (layer.units,), True
            continue
        mixing = kind in ("Softmax", "BatchNormalization") or (kind == "Activation" and cfg["activation"] == "softmax")
        if mixing and not seen_dense:
            raise HeadError(f"layer {layer.name!r} ({kind}) between the Flatten and the first Dense mixes flattened features: "
                            "a convolution cannot slide it; move it after the Dense")
        steps.append(_step(layer, kind, cfg))
    return Head(a.map_shape, steps, a.dtype)


def _step(layer: Any, kind: str, cfg: dict) -> Any:
    if kind == "Activation":
        return Activation(layer.name, _activation_name(cfg["activation"], layer.name))
    if kind == "ReLU":
        if cfg.get("threshold", 0.0) != 0:
            raise HeadError(f"threshold={cfg['threshold']} of ReLU {layer.name!r} is not supported: expected 0")
        slope, top = float(cfg.get("negative_slope", 0.0)), cfg.get("max_value")
        if top is None:
            return Activation(layer.name, leaky_relu(slope) if slope else "relu")
        if slope == 0 and float(top) == 6.0:
            return Activation(layer.name, "relu6")
        raise HeadError(f"ReLU {layer.name!r} with max_value={top} and negative_slope={slope} has no error bound: expected max_value None or 6")
    if kind == "LeakyReLU":
        return Activation(layer.name, leaky_relu(float(cfg["negative_slope"])))
    if kind == "ELU":
        if float(cfg.get("alpha", 1.0)) != 1.0:
            raise HeadError(f"alpha={cfg['alpha']} of ELU {layer.name!r} is not supported: expected 1.0")
        return Activation(layer.name, "elu")
    if kind == "Softmax":
        if cfg.get("axis", -1) not in (-1, 1):
            raise HeadError(f"axis={cfg['axis']} of Softmax {layer.name!r}: expected the units axis (-1)")
        return Activation(layer.name, "softmax")
    # BatchNormalization on the units, inference mode
    if cfg.get("axis") not in (-1, 1, [-1], [1]):
        raise HeadError(f"axis={cfg.get('axis')} of BatchNormalization {layer.name!r}: expected the units axis (-1)")
    mean, var = np.asarray(layer.moving_mean, np.float64), np.asarray(layer.moving_variance, np.float64)
    gamma = np.asarray(layer.gamma, np.float64) if layer.gamma is not None else np.ones_like(mean)
    beta = np.asarray(layer.beta, np.float64) if layer.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(cfg["epsilon"]))
    return Affine(layer.name, scale, beta - mean * scale)


# -- building ----------------------------------------------------------------------------
def _flexible_input(a: Analysis) -> Any:
    keras = _keras()
    shape = list(a.input_shape)
    if a.data_format == CHANNELS_LAST:
        shape[:-1] = [None] * (len(shape) - 1)
    else:
        shape[1:] = [None] * (len(shape) - 1)
    return keras.Input(shape=tuple(shape), dtype=a.model.inputs[0].dtype, name=a.model.inputs[0].name)


def _copy_layer(layer: Any) -> Any:
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(pairs: list[tuple[Any, Any]]) -> None:
    for old, new in pairs:
        weights = old.get_weights()
        if weights:
            new.set_weights(weights)


def flexible_body(a: Analysis) -> Any:
    """The body as a model taking any spatial size, weights copied; its output is the feature map."""
    keras = _keras()
    inp = _flexible_input(a)
    if _kind(a.model) == "Sequential":
        x, pairs = inp, []
        for layer in a.body:
            new = _copy_layer(layer)
            x = new(x)
            pairs.append((layer, new))
        body = keras.Model(inp, x, name=f"{a.model.name}_body")
    else:
        source = a.model if a.flatten is None else keras.Model(a.model.inputs[0], a.flatten.input)
        tensors = [inp] if isinstance(source.input, (list, tuple)) else inp
        body = keras.models.clone_model(source, input_tensors=tensors, clone_function=_copy_layer)
        pairs = [(layer, body.get_layer(layer.name)) for layer in a.body if _kind(layer) != "InputLayer"]
    _copy_weights(pairs)
    return body


def _conv_head(a: Analysis, head: Head) -> list[tuple[Any, Any]]:
    """New head layers, each with its weights (list) or None."""
    from equivcheck.planning import plan
    from equivcheck.presets import spec

    keras = _keras()
    L = keras.layers
    conv_class = getattr(L, f"Conv{a.rank}D")
    channel_axis = -1 if a.data_format == CHANNELS_LAST else 1
    denses = {d.name: d for d in head.denses}
    out: list[tuple[Any, Any]] = []
    for layer in a.head:
        kind, cfg = _kind(layer), layer.get_config()
        if kind == "Dense":
            d = denses[layer.name]
            sp = d.spec.spatial or (1,) * a.rank
            target = spec(f"{a.preset}:conv", channels=d.spec.channels, kernel_size=sp, units=d.spec.units, bias=d.spec.bias)
            kernel = plan(d.spec, target).apply(d.kernel)
            softmax_cf = d.activation == "softmax" and channel_axis == 1
            conv = conv_class(d.spec.units, sp, padding="valid", data_format=a.data_format, use_bias=d.spec.bias,
                              activation=None if softmax_cf else cfg.get("activation"), name=layer.name, dtype=layer.dtype_policy)
            out.append((conv, [kernel] + ([d.bias] if d.bias is not None else [])))
            if softmax_cf:
                out.append((L.Softmax(axis=1, name=f"{layer.name}_softmax"), None))
        elif kind == "Softmax" or (kind == "Activation" and cfg["activation"] == "softmax"):
            out.append((L.Softmax(axis=channel_axis, name=layer.name), None))
        elif kind == "BatchNormalization":
            out.append((L.BatchNormalization.from_config({**cfg, "axis": channel_axis}), layer.get_weights()))
        else:
            out.append((_copy_layer(layer), layer.get_weights() or None))
    return out


def convolutionalize(model: Any) -> Any:
    """A new Keras model whose Flatten → Dense head is convolutions; ``model`` is left as it was."""
    keras = _keras()
    a = analyze(model)
    if a.flatten is None:  # already size-agnostic (e.g. GlobalAveragePooling → Dense): a flexible copy
        return flexible_body(a)
    head = head_of(a)
    body = flexible_body(a)
    flatten = keras.layers.Identity(name=a.flatten.name)
    built = _conv_head(a, head)
    if _kind(model) == "Sequential":
        new = keras.Sequential([keras.Input(shape=body.inputs[0].shape[1:], dtype=body.inputs[0].dtype)],
                               name=f"{model.name}_conv")
        for layer in [*body.layers[1:], flatten, *(layer for layer, _ in built)]:
            new.add(layer)
    else:
        x = flatten(body.output)
        for layer, _ in built:
            x = layer(x)
        new = keras.Model(body.inputs[0], x, name=f"{model.name}_conv")
    for layer, weights in built:
        if weights:
            layer.set_weights(weights)
    return new


# -- verification support -----------------------------------------------------------------
@dataclass
class KerasSplit:
    """What :func:`equivcheck.fcn.verify_model` needs from a Keras model."""

    analysis: Analysis
    head: Head
    framework: str = "keras"

    def __post_init__(self) -> None:
        keras = _keras()
        a = self.analysis
        self._both = keras.Model(a.model.inputs[0], [a.model.outputs[0], a.flatten.input])
        self._body = flexible_body(a)

    @property
    def data_format(self) -> str:
        return self.analysis.data_format

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.analysis.input_shape

    @property
    def dtype(self) -> str:
        return self.analysis.dtype

    @property
    def name(self) -> str:
        return self.analysis.model.name

    def _canonical(self, y: Any) -> np.ndarray:
        y = np.asarray(y)
        return np.moveaxis(y, -1, 1) if self.data_format == CHANNELS_LAST and y.ndim > 2 else y

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.analysis.model(x, training=False))

    def run_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The original's output and the feature map its head reads, from one forward pass."""
        y, f = self._both(x, training=False)
        return np.asarray(y), self._canonical(f)

    def body_features(self, x: np.ndarray) -> np.ndarray:
        return self._canonical(self._body(x, training=False))

    def run_converted(self, converted: Any, x: np.ndarray) -> np.ndarray:
        if not is_keras_model(converted):
            raise HeadError(f"converted={type(converted).__name__} is not a Keras model: compare like with like")
        return self._canonical(converted(x, training=False))

    def stride_product(self) -> tuple[int, ...]:
        """Product of every body layer's strides, per spatial axis (a multiple of the total stride)."""
        total = [1] * self.analysis.rank
        for layer in self.analysis.body:
            if _kind(layer) in _STRIDED:
                strides = layer.get_config().get("strides") or layer.get_config().get("pool_size")
                strides = (strides,) * len(total) if isinstance(strides, int) else strides
                total = [t * int(s) for t, s in zip(total, strides)]
        return tuple(total)

    def padding_free(self) -> bool:
        """Whether no body layer pads, so a crop's features equal the whole input's at that window."""
        for layer in self.analysis.body:
            if _kind(layer) in _PADDED or layer.get_config().get("padding", "valid") != "valid":
                return False
        return True

    def describe_conversion(self) -> list[dict[str, Any]]:
        return self.head.describe(self.analysis.preset, self.analysis.rank)

    def spatial_axes(self) -> tuple[int, ...]:
        n = len(self.input_shape)
        return tuple(range(1, n)) if self.data_format == CHANNELS_LAST else tuple(range(2, n + 1))


def split(model: Any, input_shape: tuple[int, ...] | None = None) -> KerasSplit:
    a = analyze(model)
    if a.flatten is None:
        raise HeadError(f"model {model.name!r} has no Flatten → Dense head: it already accepts any input size "
                        "(e.g. GlobalAveragePooling → Dense), so there is no sliding window to verify")
    if input_shape is not None and tuple(input_shape) != a.input_shape:
        raise HeadError(f"input_shape={tuple(input_shape)} differs from the model's own {a.input_shape}: omit it for Keras models")
    return KerasSplit(a, head_of(a))

"""Presets: the layer conventions of real systems, as spec factories.

``spec("keras:dense", channels=512, spatial=(7, 7), units=4096)`` builds the
:class:`~equivcheck.specs.DenseSpec` of a Keras ``Flatten → Dense`` reading a 7×7×512 map.
Layers: ``dense``, ``conv`` (rank from ``spatial``), ``conv_transpose`` and ``depthwise``.
Every fact in this table is pinned by a test on the real framework where it is installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from equivcheck.errors import SpecError
from equivcheck.sequence import presets as sequence_presets
from equivcheck.specs import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    ConvSpec,
    DenseSpec,
    LayerSpec,
    Shape,
    positive_int,  # the one integer validator
    spatial_letters,
)

__all__ = ["LAYERS", "LAYER_KEYWORDS", "PRESETS", "PRESET_BACKENDS", "Preset", "backend_of", "build", "build_pair", "spec"]

LAYERS = ("dense", "conv", "conv_transpose", "depthwise")
_CONV = ("channels", "spatial", "units", "kernel_size", "stride", "dilation", "padding", "bias")
#: The shape keywords each layer takes; the others describe the other layer of a pair.
LAYER_KEYWORDS: dict[str, tuple[str, ...]] = {
    "dense": ("channels", "spatial", "units", "bias"),
    "conv": (*_CONV, "groups"),
    "conv_transpose": (*_CONV, "groups", "output_padding"),
    "depthwise": (*_CONV, "multiplier"),
}


@dataclass(frozen=True)
class Preset:
    """One system's conventions. Layouts use ``S`` for the spatial letters (``"OIS"`` → ``"OIHW"``)."""

    name: str
    summary: str
    data_format: str
    flatten: str  # which order the Flatten linearises the map in: channels_first / channels_last
    dense_kernel: str  # "IO" or "OI"
    conv_layout: str
    transpose_layout: str | None
    depthwise_layout: str | None
    op: str = "correlate"
    transpose_op: str | None = None  # when a transposed conv differs from ``op`` (Flax)
    backend: str = "numpy"  # the framework that runs its layers (numpy: the reference)

    def layers(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, ok in zip(LAYERS, (True, True, self.transpose_layout, self.depthwise_layout))
            if ok
        )


_CF, _CL = CHANNELS_FIRST, CHANNELS_LAST

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("keras", "Keras 3, channels_last (the default): Flatten→Dense kernel (in, out), Conv kernel HWIO",
               _CL, _CL, "IO", "SIO", "SOI", "SIM", backend="keras"),
        Preset("keras_cf", "Keras 3 with data_format='channels_first' throughout: maps NCHW, but Flatten moves "
               "channels last before flattening and kernels stay HWIO", _CF, _CL, "IO", "SIO", "SOI", "SIM", backend="keras"),
        Preset("tf", "tf.nn ops: NHWC maps, tf.reshape + tf.matmul dense (in, out), filters HWIO, "
               "conv_transpose HWOI, depthwise (h, w, in, multiplier)", _CL, _CL, "IO", "SIO", "SOI", "SIM", backend="tf"),
        Preset("torch", "PyTorch: NCHW, nn.Flatten + nn.Linear weight (out, in), Conv weight OIHW, "
               "ConvTranspose weight IOHW, depthwise as groups=in_channels", _CF, _CF, "OI", "OIS", "IOS", "OIS", backend="torch"),
        Preset("jax", "jax.lax.conv_general_dilated with its default NCHW/OIHW dimension numbers; "
               "dense x.reshape(n, -1) @ w with w (in, out)", _CF, _CF, "IO", "OIS", "IOS", "OIS", backend="jax"),
        Preset("flax", "Flax linen: NHWC, Dense kernel (in, out), Conv kernel HWIO, depthwise as "
               "feature_group_count; ConvTranspose (in, out) kernel used as-is by lax.conv_transpose"
               "(transpose_kernel=False), i.e. flipped relative to torch's", _CL, _CL, "IO", "SIO", "SIO", "SIO",
               transpose_op="convolve", backend="jax"),
        Preset("onnx", "ONNX: NCHW, Flatten + Gemm with transB=1 as exported by torch (weight (out, in)), "
               "Conv weight OIHW, ConvTranspose weight IOHW", _CF, _CF, "OI", "OIS", "IOS", "OIS", backend="onnxruntime"),
        Preset("tf2onnx", "ONNX from a Keras model by tf2onnx: NHWC input, Flatten in HWC order, Dense as "
               "MatMul + Add (weight (in, out)), Conv weight OIHW and ConvTranspose IOHW behind Transposes",
               _CL, _CL, "IO", "OIS", "IOS", "OIS", backend="onnxruntime"),
        Preset("caffe", "Caffe: NCHW, InnerProduct weight (out, in), Convolution OIHW, Deconvolution IOHW",
               _CF, _CF, "OI", "OIS", "IOS", "OIS"),
        Preset("tflite", "TensorFlow Lite: NHWC, FullyConnected weight (out, in), Conv2D filter OHWI, "
               "TransposeConv OHWI, DepthwiseConv2D (1, h, w, out)", _CL, _CL, "OI", "OSI", "OSI", "ISO", backend="tflite"),
        Preset("theano", "legacy Keras 1 on Theano: NCHW ('th' ordering), Flatten in CHW order, Dense (in, out), "
               "kernel OIHW, true convolution (kernel flipped)", _CF, _CF, "IO", "OIS", None, None, "convolve",
               backend="scipy"),
        Preset("scipy", "scipy.signal.convolve per channel pair: NCHW, true convolution (kernel flipped), "
               "kernel OIHW, dense x.reshape(n, -1) @ w with w (in, out)", _CF, _CF, "IO", "OIS", None, "OIS",
               "convolve", backend="scipy"),
    )
}
#: The backend that runs each preset's layers, for the presets not run by the numpy reference itself.
PRESET_BACKENDS: dict[str, str] = {name: p.backend for name, p in PRESETS.items() if p.backend != "numpy"}


def _layout(template: str, rank: int) -> str:
    return template.replace("S", spatial_letters(rank))


def _spatial(spatial: Any, what: str) -> tuple[int, ...]:
    if spatial is None:
        return ()
    if isinstance(spatial, int) and not isinstance(spatial, bool):
        return (spatial,)
    if not isinstance(spatial, (tuple, list)):
        raise SpecError(f"{what}={spatial!r} is not a sequence of sizes: expected e.g. (7, 7)")
    return tuple(spatial)


def parse_name(name: str) -> tuple[Preset, str]:
    """``"keras:dense"`` → (the keras preset, ``"dense"``), with errors that list the choices."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise SpecError(f"spec name={name!r} is not PRESET:LAYER: expected e.g. 'keras:dense' or 'torch:conv'")
    preset_name, layer = name.split(":")
    if preset_name not in PRESETS:
        raise SpecError(f"preset={preset_name!r} is unknown: expected one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    if layer not in preset.layers():
        raise SpecError(f"layer={layer!r} is not available for preset {preset_name!r}: expected one of {', '.join(preset.layers())}")
    return preset, layer


def spec(
    name: str,
    *,
    channels: int | None = None,
    spatial: Any = (),
    units: int | None = None,
    kernel_size: Any = None,
    stride: Any = 1,
    dilation: Any = 1,
    padding: Any = "valid",
    groups: int = 1,
    multiplier: int | None = None,
    output_padding: Any = 0,
    bias: bool = True,
    **overrides: Any,
) -> LayerSpec:
    """Build the spec of a named preset's layer.

    ``channels`` and ``spatial`` describe the feature map the layer reads; ``units`` is the
    output width (out channels for a conv). A ``conv`` without ``kernel_size`` covers the
    whole map. ``depthwise`` takes ``multiplier`` (or ``units`` = channels × multiplier).
    Any spec field may be overridden by keyword, e.g. ``data_format="channels_first"``.
    Recurrent and attention layers (``torch:lstm``, ``keras:mha`` …): :func:`equivcheck.sequence.spec`.
    """
    if sequence_presets.is_sequence_name(name):
        if channels is not None:
            raise SpecError(f"channels does not apply to {name}: pass input_size= and units= (recurrent) or embed_dim= and heads= (mha)")
        if bias is not True:  # attention layers take bias=False (Llama); a recurrent spec refuses it in one line
            overrides["bias"] = bias
        return sequence_presets.spec(name, **({"units": units} if units is not None else {}), **overrides)
    if channels is None:
        raise SpecError(f"channels is missing for {name}: pass channels=C, the channels of the map the layer reads")
    preset, layer = parse_name(name)
    spatial_t = _spatial(spatial, "spatial")
    rank = len(spatial_t)
    if layer == "dense":
        if units is None:
            raise SpecError(f"units is missing for {name}: pass units=N, the dense layer's output width")
        conv_only = {"kernel_size": kernel_size, "multiplier": multiplier}
        given = [k for k, v in conv_only.items() if v is not None]
        if given:
            raise SpecError(f"{given[0]} does not apply to a dense layer ({name})")
        fields = dict(
            channels=channels, spatial=spatial_t, units=units, data_format=preset.data_format,
            flatten=preset.flatten, kernel_layout=preset.dense_kernel, bias=bias, name=name,
        )
        return _build(DenseSpec, fields, overrides, name)

    if rank == 0 and kernel_size is None:
        raise SpecError(f"spatial is missing for {name}: pass the input map's size, e.g. spatial=(7, 7)")
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and rank:
        kernel_size = (kernel_size,) * rank  # one size for every spatial axis
    ks = _spatial(kernel_size, "kernel_size") if kernel_size is not None else spatial_t
    if rank == 0:
        rank, spatial_t = len(ks), ks
    if not 1 <= rank <= 3:
        raise SpecError(f"spatial={spatial_t} has {rank} axes: a convolution needs 1, 2 or 3")
    fields = dict(
        in_channels=channels, kernel_size=ks, spatial=spatial_t, stride=stride, dilation=dilation,
        padding=padding, data_format=preset.data_format, op=preset.op, bias=bias, name=name,
    )
    if layer == "depthwise":
        if multiplier is None:
            if units is None:
                multiplier = 1
            elif isinstance(units, int) and positive_int("channels", channels) and units % channels == 0:
                multiplier = units // channels
            else:
                raise SpecError(f"units={units} is not a multiple of channels={channels}: a depthwise conv outputs channels × multiplier")
        if groups not in (1, channels):
            raise SpecError(f"groups={groups} does not apply to depthwise ({name}): it is always groups=channels")
        fields.update(out_channels=channels * multiplier, groups=channels,
                      kernel_layout=_layout(preset.depthwise_layout, rank))
    else:
        if units is None:
            raise SpecError(f"units is missing for {name}: pass units=N, the number of output channels")
        if multiplier is not None:
            raise SpecError(f"multiplier does not apply to {name}: only depthwise layers take it")
        template = preset.conv_layout if layer == "conv" else preset.transpose_layout
        fields.update(out_channels=units, groups=groups, kernel_layout=_layout(template, rank),
                      transposed=layer == "conv_transpose", output_padding=output_padding)
        if layer == "conv_transpose" and preset.transpose_op:
            fields["op"] = preset.transpose_op
    return _build(ConvSpec, fields, overrides, name)


def backend_of(layer: LayerSpec) -> str:
    """The framework that runs a preset layer (the numpy reference for a spec of no preset)."""
    preset = PRESETS.get((layer.name or "").split(":")[0])
    return "numpy" if preset is None else preset.backend


def build(name: str, shape: Shape | None = None, **keywords: Any) -> LayerSpec:
    """The spec of preset layer ``name`` from shape keywords, taking those that apply to it.

    The one way from keywords to a spec for the CLI, explore and the checker: a ``kernel_size``
    meant for a conv target does not trouble the dense source. ``keywords`` may add spec
    fields (``data_format=...``) as :func:`spec` does.
    """
    _, layer = parse_name(name)
    given = {**(shape.given() if shape is not None else {}), **keywords}
    if "channels" not in given:
        raise SpecError(f"channels is missing for {name}: pass channels=C, the channels of the map the layer reads")
    taken = {k: v for k, v in given.items() if k in LAYER_KEYWORDS[layer] or k not in _SHAPE_FIELDS}
    if layer == "depthwise" and "units" in taken and "multiplier" in taken:
        taken.pop("units")
    ks = taken.get("kernel_size")
    if isinstance(ks, int) and not isinstance(ks, bool):  # one size for every spatial axis
        rank = max(1, len(_spatial(taken.get("spatial"), "spatial")))
        taken["kernel_size"] = (ks,) * rank
    return spec(name, **taken)


_SHAPE_FIELDS = {f.name for f in dataclasses.fields(Shape)}


def build_pair(source: str, target: str, shape: Shape) -> tuple[LayerSpec, LayerSpec]:
    """Both specs of a conversion from one set of keywords; a keyword that applies to neither is refused."""
    layers = [parse_name(name)[1] for name in (source, target)]
    for key in shape.given():
        if not any(key in LAYER_KEYWORDS[layer] for layer in layers):
            raise SpecError(f"{key} does not apply to {source} -> {target}: "
                            f"it is a keyword of {', '.join(k for k, v in LAYER_KEYWORDS.items() if key in v)} layers")
    return build(source, shape), build(target, shape)


def _build(cls: type, fields: dict[str, Any], overrides: dict[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SpecError(f"{cls.__name__} has no field {unknown[0]!r} (in spec {name!r}): expected one of {', '.join(sorted(known))}")
    return cls(**{**fields, **overrides})

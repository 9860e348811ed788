"""Sides made of real objects: torch modules and Keras layers or models, ``"module:attr"`` names, and
:func:`make_side`, which turns whatever the user passes (a preset name, a spec, a layer, a
callable) into a :class:`~equivcheck.exploration.sides.Side`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import Any

import numpy as np

from equivcheck.errors import SpecError
from equivcheck.exploration.runtimes import runtime_side
from equivcheck.exploration.sides import (
    BlackBox,
    CallableSide,
    LayerSide,
    Side,
    dense_geometry,
    preset_spec,
    probe_dtype,
    spec_side,
)
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, ConvSpec, DenseSpec, Shape

__all__ = ["KerasSide", "TorchSide", "is_preset_name", "load_object", "make_side"]


class TorchSide(Side):
    framework = "torch"

    def __init__(self, module: Any, shape: Shape) -> None:
        import torch
        from torch import nn

        leaves = [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
        label = f"torch {type(module).__name__}"
        if len(leaves) != 1:
            raise SpecError(
                f"{label} has {len(leaves)} layers with parameters: expected exactly one Linear or Conv "
                "(with parameter-free layers such as Flatten around it)"
            )
        if any(True for _ in module.buffers()):
            raise SpecError(f"{label} holds buffers (e.g. BatchNorm statistics): explore one Linear or Conv layer")
        name, leaf = leaves[0]
        extra = {n for n, _ in leaf.named_parameters(recurse=False)} - {"weight", "bias"}
        if extra:
            raise SpecError(f"{label}: layer {name or type(leaf).__name__} has parameters {sorted(extra)}: expected weight and bias")
        self.module, self._torch = module, torch
        self._wname = f"{name}.weight" if name else "weight"
        self._bname = f"{name}.bias" if name else "bias"
        kernel_shape = tuple(leaf.weight.shape)
        has_bias = leaf.bias is not None
        first_leaf = next((m for m in module.modules() if not any(True for _ in m.children())), leaf)
        if isinstance(leaf, nn.Linear):
            channels = shape.channels if shape.channels is not None else leaf.in_features
            spatial = shape.spatial_or(())
            if channels * math.prod(spatial) != leaf.in_features:
                raise SpecError(
                    f"{label}: channels={channels} × spatial={spatial} is {channels * math.prod(spatial)} features, "
                    f"but the Linear reads in_features={leaf.in_features}"
                )
            geometry = dense_geometry(channels, spatial, leaf.out_features, has_bias)
            kind, flat = "dense", first_leaf is leaf
            rank0 = not spatial
        elif isinstance(leaf, nn.modules.conv._ConvNd):
            if leaf.padding_mode != "zeros":
                raise SpecError(f"{label}: padding_mode={leaf.padding_mode!r} is not supported: expected 'zeros'")
            pad = leaf.padding if isinstance(leaf.padding, str) else tuple(leaf.padding)
            spatial = shape.spatial_or(tuple(leaf.kernel_size))
            if shape.channels is not None and shape.channels != leaf.in_channels:
                raise SpecError(f"{label}: channels={shape.channels} but the conv reads in_channels={leaf.in_channels}")
            geometry = ConvSpec(
                leaf.in_channels, leaf.out_channels, tuple(leaf.kernel_size), spatial=spatial, stride=tuple(leaf.stride),
                dilation=tuple(leaf.dilation), padding=pad, groups=leaf.groups, transposed=bool(leaf.transposed),
                output_padding=tuple(leaf.output_padding) if leaf.transposed else 0, bias=has_bias,
            )
            kind, flat, rank0 = "conv", False, False
        else:
            raise SpecError(f"{label}: layer type {type(leaf).__name__} is not supported: expected nn.Linear or nn.ConvNd")
        supports64 = True
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=kernel_shape, has_bias=has_bias,
                         data_format=CHANNELS_FIRST, dtype=probe_dtype(math.prod(kernel_shape), supports64),
                         flat_input=flat, rank0=rank0)

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        torch = self._torch
        from torch.func import functional_call

        params = {self._wname: torch.from_numpy(kernel)}
        if bias is not None:
            params[self._bname] = torch.from_numpy(bias)
        with torch.no_grad():
            return functional_call(self.module, params, (torch.from_numpy(x),))


# -- keras ---------------------------------------------------------------------------------
class KerasSide(Side):
    framework = "keras"

    def __init__(self, obj: Any, shape: Shape) -> None:
        import keras

        L = keras.layers
        label = f"keras {type(obj).__name__}"
        layers = list(obj.layers) if isinstance(obj, keras.Model) else [obj]
        weighted = [layer for layer in layers if layer.weights or isinstance(layer, (L.Dense, *_keras_convs(L)))]
        if len(weighted) != 1:
            raise SpecError(f"{label} has {len(weighted)} layers with weights: expected exactly one Dense or Conv")
        leaf = weighted[0]
        first = layers[0]
        flatten_first = isinstance(first, L.Flatten)
        if isinstance(leaf, L.Dense):
            fmt = first.data_format if flatten_first else CHANNELS_LAST
            in_dim = self._input_dim(obj, leaf, shape, fmt, flatten_first)
            channels, spatial = shape.channels, shape.spatial
            dims = _keras_input_dims(obj)
            if dims and len(dims) >= 2 and flatten_first:
                channels = dims[0] if fmt == CHANNELS_FIRST else dims[-1]
                spatial = dims[1:] if fmt == CHANNELS_FIRST else dims[:-1]
                if shape.channels is not None and (shape.channels, shape.spatial_or(spatial)) != (channels, spatial):
                    raise SpecError(f"{label} reads a map of shape {dims}: channels={shape.channels}, "
                                    f"spatial={shape.spatial} do not match it ({fmt})")
            channels = channels if channels is not None else in_dim
            spatial = tuple(spatial or ())
            if channels * math.prod(spatial) != in_dim:
                raise SpecError(
                    f"{label}: channels={channels} × spatial={spatial} is {channels * math.prod(spatial)} features, "
                    f"but the Dense reads {in_dim}"
                )
            geometry = dense_geometry(channels, spatial, leaf.units, leaf.use_bias)
            kind, flat, rank0 = "dense", not flatten_first, not spatial
        else:
            geometry, fmt = self._conv_geometry(L, leaf, shape, label)
            kind, flat, rank0 = "conv", False, False
            if not leaf.built:
                obj.build((None, *_map_shape(geometry, fmt)))
        if isinstance(leaf, L.Dense) and not leaf.built:
            obj.build((None, *(_map_shape(geometry, fmt) if flatten_first else (geometry.in_channels * math.prod(geometry.spatial),))))
        self.obj, self.leaf = obj, leaf
        kvar = leaf.kernel
        self._kernel_var, self._bias_var = kvar, getattr(leaf, "bias", None)
        dtype = "float64" if str(kvar.dtype) == "float64" else "float32"
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=tuple(kvar.shape),
                         has_bias=self._bias_var is not None, data_format=fmt, dtype=dtype, flat_input=flat, rank0=rank0)

    @staticmethod
    def _input_dim(obj: Any, leaf: Any, shape: Shape, fmt: str, flatten_first: bool) -> int:
        if leaf.built:
            return int(leaf.kernel.shape[0])
        if shape.channels is None:
            raise SpecError(f"keras {type(obj).__name__} is not built: pass channels= (and spatial=) so it can be")
        return shape.channels * math.prod(shape.spatial_or(()))

    @staticmethod
    def _conv_geometry(L: Any, leaf: Any, shape: Shape, label: str) -> tuple[ConvSpec, str]:
        fmt = leaf.data_format
        if leaf.padding not in ("valid", "same"):
            raise SpecError(f"{label}: padding={leaf.padding!r} is not supported: expected 'valid' or 'same'")
        ks = tuple(leaf.kernel_size)
        transposed = isinstance(leaf, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose))
        depthwise = isinstance(leaf, (L.DepthwiseConv1D, L.DepthwiseConv2D))
        if leaf.built:
            kshape = tuple(leaf.kernel.shape)
            in_channels = kshape[-2] if depthwise else (kshape[-1] if transposed else kshape[-2] * leaf.groups)
        else:
            in_channels = shape.need_channels(label)
        if shape.channels is not None and shape.channels != in_channels:
            raise SpecError(f"{label}: channels={shape.channels} but the layer reads {in_channels} channels")
        if transposed:
            if leaf.padding != "valid" or getattr(leaf, "output_padding", None) is not None:
                raise SpecError(f"{label}: only padding='valid' without output_padding is supported for transposed convs")
            out, groups = leaf.filters, 1
        elif depthwise:
            out, groups = in_channels * leaf.depth_multiplier, in_channels
        else:
            out, groups = leaf.filters, leaf.groups
        geometry = ConvSpec(
            in_channels, out, ks, spatial=shape.spatial_or(ks), stride=tuple(leaf.strides),
            dilation=tuple(leaf.dilation_rate), padding=leaf.padding, groups=groups, transposed=transposed,
            bias=leaf.use_bias,
        )
        return geometry, fmt

    @staticmethod
    def _tensor(a: np.ndarray) -> Any:
        """Hand an aligned array to TensorFlow without a copy (DLPack); anything else as is."""
        from equivcheck.backends._tensorflow import tensor_in_place

        keras = sys.modules["keras"]
        shared = tensor_in_place(a) if keras.backend.backend() == "tensorflow" else None
        return a if shared is None else shared

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        values = []
        for v in self.obj.trainable_variables:
            if v is self._kernel_var:
                values.append(self._tensor(kernel))
            elif v is self._bias_var and bias is not None:
                values.append(bias)
            else:
                values.append(v.value)
        fixed = [v.value for v in self.obj.non_trainable_variables]
        y, _ = self.obj.stateless_call(values, fixed, x)
        return y


def _keras_input_dims(obj: Any) -> tuple[int, ...] | None:
    """Per-sample input shape of a built Keras model, when it is fully known."""
    try:
        shape = obj.input_shape
    except (AttributeError, ValueError):
        return None
    if not isinstance(shape, tuple) or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    return tuple(int(d) for d in shape[1:])


def _keras_convs(L: Any) -> tuple[type, ...]:
    return (L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose,
            L.DepthwiseConv1D, L.DepthwiseConv2D)


def _map_shape(geometry: ConvSpec, fmt: str) -> tuple[int, ...]:
    c, s = geometry.in_channels, geometry.spatial
    return (c, *s) if fmt == CHANNELS_FIRST else (*s, c)


# -- dispatch ------------------------------------------------------------------------------
def import_user_module(name: str) -> Any:
    """Import ``name`` without letting the working folder shadow installed packages.

    The module is looked for with the working folder off ``sys.path`` (a ``torch.py`` lying there
    must not run in place of torch); only when it cannot be found so is the working folder added,
    behind every installed package. ``sys.path`` is restored afterwards either way.
    """
    saved = list(sys.path)
    here = os.getcwd()
    elsewhere = [p for p in saved if p not in ("", ".") and os.path.abspath(p) != here]
    try:
        sys.path[:] = elsewhere
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that is not installed
            found = False
        if not found:
            sys.path[:] = [*elsewhere, here]
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def load_object(path: str) -> Any:
    """The object named ``module:attr`` (``attr`` may be dotted); see :func:`import_user_module` for where it is found."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SpecError(f"object={path!r} is not MODULE:ATTR: expected e.g. 'mymodels:fc6'")
    try:
        obj: Any = import_user_module(module_name)
    except ImportError as exc:
        raise SpecError(f"module={module_name!r} cannot be imported ({exc}): check the name and the working folder") from None
    except Exception as exc:
        raise SpecError(f"module={module_name!r} failed while importing: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"object={path!r} not found: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def is_preset_name(text: str) -> bool:
    from equivcheck.presets import PRESETS

    return text.count(":") == 1 and text.split(":")[0] in PRESETS


def make_side(obj: Any, shape: Shape, backend: str | None = None) -> Side:
    """A :class:`Side` for a preset name, spec, backend layer, torch/Keras layer, BlackBox, callable, or an
    ONNX/TFLite model (see :mod:`equivcheck.exploration.runtimes`)."""
    from equivcheck.backends.base import Layer

    if isinstance(obj, Side):
        return obj
    runtime = runtime_side(obj, shape)  # .onnx/.tflite paths, bytes, ModelProto, InferenceSession, (model, NODE)
    if runtime is not None:
        return runtime
    if isinstance(obj, str):
        if is_preset_name(obj):
            return spec_side(preset_spec(obj, shape), backend)
        from equivcheck.presets import LAYERS, parse_name

        prefix, _, layer = obj.partition(":")
        if layer in LAYERS and "." not in prefix:
            parse_name(obj)  # a mistyped preset: its error lists the presets
        obj = load_object(obj)
    if isinstance(obj, (DenseSpec, ConvSpec)):
        return spec_side(obj, backend)
    if isinstance(obj, Layer):
        return LayerSide(obj, f"{obj.spec.name or obj.spec.kind} ({type(obj).__module__.rsplit('.', 1)[-1]})")
    if isinstance(obj, BlackBox):
        return CallableSide(obj, shape)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return TorchSide(obj, shape)
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(obj, keras.layers.Layer):
        return KerasSide(obj, shape)
    if callable(obj):
        return CallableSide(BlackBox.from_callable(obj), shape)
    raise SpecError(
        f"layer of type={type(obj).__name__} is not supported: expected a preset name ('keras:dense'), a spec, "
        "a torch nn.Module, a Keras layer or model, an ONNX model or path (with a NODE), TFLite bytes or path, "
        "or a callable fn(x, kernel, bias) with kernel_shape"
    )

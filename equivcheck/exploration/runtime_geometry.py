"""What the ONNX and TFLite sides share: the linear ops they explore and their geometry from a model's declarations."""

from __future__ import annotations

import math
from typing import Any

from equivcheck.errors import SpecError
from equivcheck.exploration.sides import dense_geometry
from equivcheck.specs import ConvSpec, Shape

__all__ = ["ONNX_DTYPES", "ONNX_LINEAR", "TFLITE_LINEAR", "conv_geometry", "declared_spatial", "dense_node_geometry"]

ONNX_LINEAR = ("Gemm", "MatMul", "Conv", "ConvTranspose")
TFLITE_LINEAR = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")
ONNX_DTYPES = {1: "float32", 11: "float64"}  # TensorProto FLOAT, DOUBLE


def declared_spatial(label: str, shape: Shape, declared: tuple[int | None, ...]) -> tuple[int, ...]:
    """The map's spatial size: as declared, else ``spatial=``; a given ``spatial`` must agree with a declared one."""
    if all(d is not None for d in declared):
        spatial = tuple(int(d) for d in declared)
        if shape.spatial is not None and tuple(shape.spatial) != spatial:
            raise SpecError(f"{label}: spatial={tuple(shape.spatial)} but the model declares a map of {spatial}")
        return spatial
    if shape.spatial is None or len(tuple(shape.spatial)) != len(declared):
        raise SpecError(f"{label}: the model leaves the map's size open ({declared}): pass spatial= with "
                        f"{len(declared)} sizes")
    return tuple(shape.spatial)


def dense_node_geometry(label: str, shape: Shape, features: int, units: int, has_bias: bool,
           known: tuple[int, tuple[int, ...]] | None = None) -> tuple[ConvSpec, bool]:
    """A dense geometry reading ``features`` (a flattened map, ``known`` when the model says which); rank0 when plain."""
    channels = shape.channels if shape.channels is not None else (known[0] if known else features)
    spatial = tuple(shape.spatial_or(known[1] if known and shape.channels in (None, known[0]) else ()))
    if channels * math.prod(spatial) != features:
        raise SpecError(f"{label}: channels={channels} × spatial={spatial} is {channels * math.prod(spatial)} "
                        f"features, but the layer reads {features}")
    return dense_geometry(channels, spatial, units, has_bias), not spatial


def conv_geometry(label: str, *args: Any, **kwargs: Any) -> ConvSpec:
    try:
        return ConvSpec(*args, **kwargs)
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None

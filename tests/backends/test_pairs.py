"""Every ordered pair of backends on representative conversions, in float32.

The source layer follows the source backend's own conventions (its preset), the target the
target backend's; the planned conversion must make the two real layers agree, and every
plausible wrong conversion must be rejected on the same data.
"""

from __future__ import annotations

import pytest

from equivcheck.verification import verify_pair

from ._support import BACKEND_NAMES, assert_verdict, preset_spec, require

CF = "channels_first"

# name -> (source layer, target layer, spec arguments shared by both, per-side overrides)
CONVERSIONS = {
    "dense-to-conv": ("dense", "conv", dict(channels=3, spatial=(4, 5), units=6), {}),
    "conv-to-dense-channels-first": (
        "conv", "dense", dict(channels=2, spatial=(3, 4), units=5, bias=False), dict(data_format=CF),
    ),
    "conv2d-strided-same": (
        "conv", "conv", dict(channels=3, spatial=(7, 6), kernel_size=(3, 2), units=4, stride=2, padding="same"), {},
    ),
    "conv3d": ("conv", "conv", dict(channels=2, spatial=(3, 4, 3), kernel_size=(2, 3, 2), units=3, bias=False), {}),
    "conv-transpose1d": (
        "conv_transpose", "conv_transpose",
        dict(channels=3, spatial=(5,), kernel_size=(3,), units=2, stride=2, padding=1, output_padding=1, bias=False), {},
    ),
    "depthwise2d": ("depthwise", "depthwise", dict(channels=3, spatial=(5, 7), kernel_size=(3, 3), multiplier=2), {}),
    "grouped-conv1d": ("conv", "conv", dict(channels=4, spatial=(6,), kernel_size=(3,), units=6, groups=2), {}),
}
# The runtimes (ONNX Runtime, TFLite) against the reference, torch and Keras (and each other); the rest all pairs.
RUNTIMES = ("onnxruntime", "tflite")
PARTNERS = ("numpy", "torch", "keras", *RUNTIMES)
PAIRS = [(a, b) for a in BACKEND_NAMES for b in BACKEND_NAMES
         if a != b and (a not in RUNTIMES or b in PARTNERS) and (b not in RUNTIMES or a in PARTNERS)]


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize(("source_backend", "target_backend"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_pair(source_backend, target_backend, conversion):
    require(source_backend)
    require(target_backend)
    src_layer, dst_layer, shared, overrides = CONVERSIONS[conversion]
    source = preset_spec(source_backend, src_layer, **shared, **overrides)
    target = preset_spec(target_backend, dst_layer, **shared, **overrides)
    case = verify_pair(source, target, source_backend=source_backend, target_backend=target_backend, dtype="float32")
    assert_verdict(case, (source_backend, target_backend))

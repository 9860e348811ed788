"""Every backend against the numpy reference: each layer kind, rank and data format, in every dtype.

The source layer runs on numpy under another system's conventions (so the planner's mapping
is never trivial); the converted target is the backend's own preset layer. float32 cases also
run the catalogue of wrong conversions on the backend (bfloat16 too: its bound is the loosest);
float64 and float16 check the value only.
"""

from __future__ import annotations

import pytest

import equivcheck as ec
from equivcheck.verification import verify_pair

from ._support import BACKEND_NAMES, assert_verdict, preset_spec, require

CF, CL = "channels_first", "channels_last"


def _kinds():
    """name -> (source spec on numpy, kwargs for the backend's preset spec)."""
    map3 = dict(channels=3, spatial=(4, 5))
    return {
        "dense": (ec.spec("onnx:dense", units=5, **map3), ("dense", dict(units=5, **map3))),
        "dense-any-flatten-order": (
            ec.spec("keras:dense", units=4, channels=2, spatial=(2, 3, 2), bias=False),
            ("dense", dict(units=4, channels=2, spatial=(2, 3, 2), flatten="WCDH", bias=False)),
        ),
        "dense-to-conv-whole-map": (ec.spec("keras:dense", units=5, **map3), ("conv", dict(units=5, **map3))),
        "conv1d-stride-same": (
            ec.spec("theano:conv", channels=3, spatial=(9,), kernel_size=(3,), units=4, stride=2, padding="same"),
            ("conv", dict(channels=3, spatial=(9,), kernel_size=(3,), units=4, stride=2, padding="same")),
        ),
        "conv2d-even-kernel-same": (
            ec.spec("theano:conv", channels=3, spatial=(5, 6), kernel_size=(2, 3), units=4, padding="same", bias=False),
            ("conv", dict(channels=3, spatial=(5, 6), kernel_size=(2, 3), units=4, padding="same", bias=False)),
        ),
        "conv2d-dilated-padded": (
            ec.spec("tflite:conv", channels=2, spatial=(7, 6), kernel_size=(3, 2), units=3, dilation=2, padding=1),
            ("conv", dict(channels=2, spatial=(7, 6), kernel_size=(3, 2), units=3, dilation=2, padding=1)),
        ),
        "conv3d": (
            ec.spec("theano:conv", channels=2, spatial=(4, 3, 4), kernel_size=(2, 2, 3), units=3, stride=(1, 2, 1)),
            ("conv", dict(channels=2, spatial=(4, 3, 4), kernel_size=(2, 2, 3), units=3, stride=(1, 2, 1))),
        ),
        "grouped-conv2d": (
            ec.spec("tflite:conv", channels=4, spatial=(5, 4), kernel_size=(3, 2), units=6, groups=2),
            ("conv", dict(channels=4, spatial=(5, 4), kernel_size=(3, 2), units=6, groups=2)),
        ),
        "conv-transpose1d": (
            ec.spec("torch:conv_transpose", channels=3, spatial=(5,), kernel_size=(3,), units=4, stride=2, padding=1, output_padding=1),
            ("conv_transpose", dict(channels=3, spatial=(5,), kernel_size=(3,), units=4, stride=2, padding=1, output_padding=1)),
        ),
        "conv-transpose2d": (
            ec.spec("keras:conv_transpose", channels=3, spatial=(4, 3), kernel_size=(3, 2), units=2, stride=(2, 1), padding=(1, 0), bias=False),
            ("conv_transpose", dict(channels=3, spatial=(4, 3), kernel_size=(3, 2), units=2, stride=(2, 1), padding=(1, 0), bias=False)),
        ),
        "conv-transpose3d-dilated": (
            ec.spec("torch:conv_transpose", channels=2, spatial=(3, 2, 3), kernel_size=(2, 2, 2), units=3, dilation=2),
            ("conv_transpose", dict(channels=2, spatial=(3, 2, 3), kernel_size=(2, 2, 2), units=3, dilation=2)),
        ),
        "depthwise1d": (
            ec.spec("tflite:depthwise", channels=3, spatial=(7,), kernel_size=(3,), multiplier=2),
            ("depthwise", dict(channels=3, spatial=(7,), kernel_size=(3,), multiplier=2)),
        ),
        "depthwise2d": (
            ec.spec("keras:depthwise", channels=3, spatial=(6, 5), kernel_size=(3, 3), stride=2, bias=False),
            ("depthwise", dict(channels=3, spatial=(6, 5), kernel_size=(3, 3), stride=2, bias=False)),
        ),
        "depthwise3d": (
            ec.spec("torch:depthwise", channels=2, spatial=(3, 4, 3), kernel_size=(2, 2, 2), multiplier=2),
            ("depthwise", dict(channels=2, spatial=(3, 4, 3), kernel_size=(2, 2, 2), multiplier=2)),
        ),
    }


KINDS = _kinds()
DTYPES = ("float32", "float64", "float16", "bfloat16")
TARGETS = BACKEND_NAMES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_format", (CF, CL))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", TARGETS)
def test_backend_matches_numpy(backend, kind, data_format, dtype):
    require(backend)
    source, (layer, kwargs) = KINDS[kind]
    target = preset_spec(backend, layer, data_format=data_format, **kwargs)
    mutations = dtype in ("float32", "bfloat16")  # bfloat16: the loosest bound must still reject wrong conversions
    case = verify_pair(source, target, source_backend="numpy", target_backend=backend, dtype=dtype, mutants=mutations)
    assert_verdict(case, ("numpy", backend), mutations=mutations)

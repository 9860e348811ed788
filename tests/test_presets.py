"""Presets: the named conventions, the motivating case under each, and spec() errors.

The facts behind each preset are pinned on the real frameworks in tests/backends/.
"""

import itertools

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.presets import PRESETS
from equivcheck.verification import verify_pair

FC6 = dict(channels=512, spatial=(7, 7), units=4096)


def test_issue_example_keras_dense_to_torch_conv():
    m = ec.plan(ec.spec("keras:dense", **FC6), ec.spec("torch:conv", **FC6))
    assert m.code("numpy") == "w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)"
    assert m.in_shape == (25088, 4096) and m.out_shape == (4096, 512, 7, 7)


def test_legacy_theano_answer():
    m = ec.plan(ec.spec("theano:dense", **FC6), ec.spec("theano:conv", **FC6))
    assert m.code("numpy") == "w.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1]"


def test_keras_channels_first_flatten_is_channels_last():
    # Keras 3's Flatten(data_format="channels_first") moves channels last before flattening.
    s = ec.spec("keras_cf:dense", **FC6)
    assert s.data_format == "channels_first" and s.flatten == "HWC"
    assert ec.plan(s, ec.spec("keras:dense", **FC6)).is_identity


@pytest.mark.parametrize("a, b", list(itertools.product(PRESETS, PRESETS)))
def test_every_preset_pair_verifies_on_the_reference(a, b):
    kw = dict(channels=3, spatial=(4, 5), units=2)
    for la, lb in (("dense", "conv"), ("conv", "dense"), ("dense", "dense"), ("conv", "conv")):
        case = verify_pair(ec.spec(f"{a}:{la}", **kw), ec.spec(f"{b}:{lb}", **kw), batch=2)
        assert case.verdict == "pass", (a, la, b, lb, case.reason)


@pytest.mark.parametrize("preset", [p for p in PRESETS if "conv_transpose" in PRESETS[p].layers()])
def test_conv_transpose_presets_map_to_torch(preset):
    kw = dict(channels=4, spatial=(3, 5), units=6, kernel_size=(2, 3), stride=2)
    case = verify_pair(ec.spec(f"{preset}:conv_transpose", **kw), ec.spec("torch:conv_transpose", **kw), batch=2)
    assert case.verdict == "pass", case.reason


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("keras", dict(channels=1, units=1), r"not PRESET:LAYER"),
        ("pytorch:dense", dict(channels=1, units=1), r"preset='pytorch' is unknown: expected one of keras"),
        ("keras:linear", dict(channels=1, units=1), r"layer='linear' is not available"),
        ("theano:conv_transpose", dict(channels=1, units=1), r"layer='conv_transpose' is not available for preset 'theano'"),
        ("keras:dense", dict(channels=1), r"units is missing"),
        ("keras:conv", dict(channels=1, units=1), r"spatial is missing"),
        ("keras:dense", dict(channels=1, units=1, kernel_size=(3,)), r"kernel_size does not apply to a dense layer"),
        ("keras:depthwise", dict(channels=3, spatial=(4,), units=4), r"units=4 is not a multiple of channels=3"),
        ("keras:dense", dict(channels=1, units=1, colour="red"), r"has no field 'colour'|bad argument"),
    ],
)
def test_spec_errors_name_the_problem(name, kwargs, match):
    with pytest.raises(ec.SpecError, match=match):
        ec.spec(name, **kwargs)


def test_conv_default_kernel_covers_the_map_and_rank_follows_spatial():
    c = ec.spec("keras:conv", channels=2, spatial=(3, 4, 5), units=6)
    assert c.kernel_size == (3, 4, 5) and c.kernel_layout == "DHWIO" and c.covers_map
    small = ec.spec("keras:conv", channels=512, spatial=(14, 14), units=256, kernel_size=(3, 3))
    assert small.kernel_shape == (3, 3, 512, 256) and small.output_spatial == (12, 12)


def test_presets_name_their_real_layouts():
    expect = {
        "keras": ("HWIO", (25088, 4096)), "torch": ("OIHW", (4096, 25088)), "tflite": ("OHWI", (4096, 25088)),
        "theano": ("OIHW", (25088, 4096)), "onnx": ("OIHW", (4096, 25088)), "tf": ("HWIO", (25088, 4096)),
    }
    for name, (layout, dense_shape) in expect.items():
        assert ec.spec(f"{name}:conv", **FC6).kernel_layout == layout
        assert ec.spec(f"{name}:dense", **FC6).kernel_shape == dense_shape
    assert ec.spec("theano:conv", **FC6).op == ec.spec("scipy:conv", **FC6).op == "convolve"


def test_apply_converts_real_fc6_sized_weights():
    w = np.random.default_rng(0).standard_normal((25088, 64)).astype(np.float32)
    kw = dict(channels=512, spatial=(7, 7), units=64)
    m = ec.plan(ec.spec("theano:dense", **kw), ec.spec("theano:conv", **kw))
    np.testing.assert_array_equal(m.apply(w), w.T.reshape(64, 512, 7, 7)[:, :, ::-1, ::-1])


# -- one builder, one backend per preset ----------------------------------------------------
def test_every_preset_names_the_framework_that_runs_it():
    from equivcheck import backends

    for name, preset in ec.PRESETS.items():
        assert preset.backend in backends.BACKENDS, name
    assert ec.PRESETS["theano"].backend == "scipy" and ec.PRESETS["onnx"].backend == "onnxruntime"


def test_build_takes_the_keywords_that_apply_to_each_layer():
    shape = ec.Shape(channels=4, spatial=(6, 6), units=8, kernel_size=3, stride=2, groups=2, multiplier=2)
    dense = ec.build("keras:dense", shape)
    assert dense.in_features == 144 and dense.units == 8
    conv = ec.build("torch:conv", shape)
    assert conv.kernel_size == (3, 3) and conv.groups == 2 and conv.stride == (2, 2)  # an int: every axis
    depthwise = ec.build("torch:depthwise", shape)
    assert depthwise.out_channels == 8 and depthwise.groups == 4  # multiplier, not groups


def test_build_pair_refuses_a_keyword_that_applies_to_neither_layer():
    from equivcheck.presets import build_pair

    with pytest.raises(ec.SpecError, match="kernel_size does not apply to keras:dense -> torch:dense"):
        build_pair("keras:dense", "torch:dense", ec.Shape(channels=2, spatial=(2, 2), units=3, kernel_size=(2, 2)))
    with pytest.raises(ec.SpecError, match="multiplier does not apply"):
        build_pair("keras:conv", "torch:conv", ec.Shape(channels=2, spatial=(4, 4), units=4, multiplier=2))
    src, dst = build_pair("keras:dense", "torch:conv", ec.Shape(channels=2, spatial=(2, 2), units=3, kernel_size=(2, 2)))
    assert src.in_features == 8
    assert dst.kernel_size == (2, 2)

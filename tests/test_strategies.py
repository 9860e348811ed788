"""Hypothesis strategies: validation, shapes within bounds, shrinking, and data that tells conventions apart."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck import strategies as es
from equivcheck.errors import SpecError
from equivcheck.mutations import mutants
from equivcheck.planning import canonical

FAST = settings(max_examples=20, deadline=None)


# -- argument validation happens at call time ----------------------------------------------
@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (es.dense_specs, {"min_channels": 5, "max_channels": 3}, "min_channels=5 is greater than max_channels=3"),
        (es.dense_specs, {"max_rank": 4}, "max_rank=4"),
        (es.dense_specs, {"presets": ["nope"]}, "'nope'"),
        (es.dense_specs, {"min_units": 0}, "min_units=0"),
        (es.conv_specs, {"min_kernel": 9, "max_kernel": 9, "max_side": 4}, "min_kernel=9 is larger than max_side=4"),
        (es.conv_specs, {"paddings": ["wide"]}, "paddings contains 'wide'"),
        (es.conv_specs, {"layers": ["depthwise"]}, "layers contains 'depthwise'"),
        (es.conv_specs, {"data_formats": ["NCW"]}, "data_formats contains 'NCW'"),
        (es.conv_specs, {"max_stride": 0}, "max_stride=0"),
        (es.spec_pairs, {"kinds": ["dense->pool"]}, "kinds contains 'dense->pool'"),
        (es.spec_pairs, {"kinds": ["conv_transpose->conv_transpose"], "presets": ["theano"]}, "no 'conv_transpose' layer"),
        (es.spec_pairs, {"min_side": 1.5}, "min_side=1.5 is not an integer"),
        (es.dtypes, {"names": ["float8"]}, "names contains 'float8'"),
        (es.backends, {"names": ["caffe2"]}, "names contains 'caffe2'"),
        (es.backends, {"names": ["numpy"], "min_size": 2}, "min_size=2"),
    ],
)
def test_bad_arguments_raise_at_once(factory, kwargs, match):
    with pytest.raises(SpecError, match=match):
        factory(**kwargs)


def test_weights_and_inputs_validate_their_arguments():
    with pytest.raises(SpecError, match="not a DenseSpec or ConvSpec"):
        es.weights("keras:dense")
    s = ec.spec("onnx:dense", channels=2, spatial=(2,), units=2)
    with pytest.raises(SpecError, match="dtype='int8'"):
        es.inputs(s, dtype="int8")
    with pytest.raises(SpecError, match="batch=0"):
        es.inputs(s, batch=0)


# -- generated specs -------------------------------------------------------------------------
@FAST
@given(es.dense_specs(min_channels=2, max_channels=4, min_rank=0, max_rank=3, max_side=3, max_units=5))
def test_dense_specs_stay_within_bounds(s):
    assert isinstance(s, ec.DenseSpec)
    assert 2 <= s.channels <= 4 and 0 <= s.rank <= 3 and all(1 <= n <= 3 for n in s.spatial) and 1 <= s.units <= 5


@FAST
@given(es.conv_specs(max_rank=3, max_groups=3, max_stride=2, max_dilation=2, max_side=6,
                     paddings=("valid", "same", 1), layers=("conv", "conv_transpose"),
                     data_formats=("channels_last",)))
def test_conv_specs_are_valid_and_honour_overrides(s):
    assert isinstance(s, ec.ConvSpec) and 1 <= s.rank <= 3
    assert s.data_format == "channels_last"
    assert s.in_channels % s.groups == 0 and s.out_channels % s.groups == 0
    assert all(o >= 1 for o in s.output_spatial)
    assert max(s.stride) <= 2 and max(s.dilation) <= 2 and s.groups <= 3


@FAST
@given(es.spec_pairs(kinds=(*es.KINDS, "conv_transpose->conv_transpose"), max_rank=3))
def test_spec_pairs_can_be_planned_and_every_mutant_moves_weights(pair):
    source, target = pair
    mapping = ec.plan(source, target)
    found = mutants(source, target, mapping)
    assert found, "every pair has wrong conversions to reject"
    assert not [m.name for m in found if m.ambiguous]
    assert mapping.out_shape == target.kernel_shape


@pytest.mark.parametrize("kind", es.KINDS)
def test_each_pair_kind_is_generated(kind):
    src, dst = find(es.spec_pairs(kinds=[kind]), lambda p: True)
    assert f"{src.kind}->{dst.kind}" == kind


def test_shrinks_toward_the_smallest_shape_and_first_preset():
    s = find(es.conv_specs(max_rank=3, max_stride=2, max_dilation=2), lambda s: s.rank == 3)
    assert s.kernel_size == (1, 1, 1) and s.spatial == (1, 1, 1) and s.in_channels == 1 and s.out_channels == 1
    assert s.stride == (1, 1, 1) and s.name == "keras:conv"
    src, dst = find(es.spec_pairs(kinds=["dense->conv"]), lambda p: True)
    assert (src.channels, src.spatial, src.units) == (2, (2,), 2)
    assert src.name == "keras:dense" and dst.name == "keras:conv"
    d = find(es.dense_specs(), lambda s: s.units >= 3)
    assert d.units == 3 and d.channels == 1


def test_dtypes_and_backends_strategies():
    assert find(es.dtypes(), lambda d: True) == "float32"
    assert find(es.dtypes(names=["bfloat16", "float16"]), lambda d: d == "float16") == "float16"
    from equivcheck.checker import installed_backends

    installed = set(installed_backends())
    got = find(es.backends(), lambda b: True)
    assert got == ("numpy",)

    @FAST
    @given(es.backends(min_size=1))
    def subsets(b):
        assert set(b) <= installed and len(set(b)) == len(b) >= 1

    subsets()


# -- data that can tell conventions apart ----------------------------------------------------
SPECS = [
    ec.spec("keras:dense", channels=3, spatial=(2, 4), units=2),
    ec.spec("theano:conv", channels=2, spatial=(3, 3), units=2),
    ec.spec("keras:conv", channels=2, spatial=(5, 6), units=3, kernel_size=(2, 3)),
    ec.spec("caffe:conv", channels=1, spatial=(1, 2, 2), units=1),
    ec.spec("onnx:dense", channels=1, spatial=(3,), units=1),
    ec.spec("tflite:dense", channels=4, units=2),
]


def _flip_invariant(a: np.ndarray, axes) -> bool:
    return any(a.shape[ax] > 1 and np.array_equal(a, np.flip(a, ax)) for ax in axes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_weights_are_never_degenerate_or_flip_symmetric(spec, dtype):
    @FAST
    @given(es.weights(spec, dtype=dtype))
    def check(weights):
        kernel, bias = weights
        assert kernel.shape == spec.kernel_shape and kernel.dtype == ec.backends.np_dtype(dtype)
        flat = kernel.astype(np.float64).ravel()
        assert np.any(flat != 0) and (flat.size == 1 or np.any(flat != flat[0]))
        canon = canonical(spec).apply(kernel)
        assert not _flip_invariant(canon, range(2, canon.ndim))
        assert bias.shape == spec.bias_shape and np.all(bias != 0)
        assert len(np.unique(bias.astype(np.float64))) == bias.size

    check()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_inputs_are_never_degenerate_or_flip_symmetric(spec):
    @FAST
    @given(es.inputs(spec, batch=6, dtype="float16"))
    def check(x):
        assert x.shape == (6, *spec.input_shape) and x.dtype == np.float16
        canon = np.moveaxis(x, -1, 1) if spec.data_format == "channels_last" and x.ndim > 2 else x
        for sample in canon.astype(np.float64):
            assert np.any(sample != 0)
            assert sample.size == 1 or np.any(sample != sample.flat[0])
            assert not _flip_invariant(sample, range(1, sample.ndim))

    check()


def test_inputs_stay_asymmetric_even_when_values_collide():
    """A 1×3 map with one non-zero value is symmetric when it sits in the middle: never produced."""
    spec = ec.spec("caffe:conv", channels=1, spatial=(3,), units=1)
    for seed in range(30):
        x = es.sample_inputs(spec, 8, "bfloat16", np.random.default_rng(seed))
        assert not any(np.array_equal(s, s[:, ::-1]) for s in x.astype(np.float64))


def test_large_fan_in_inputs_are_sparse_and_cover_every_position():
    spec = ec.spec("keras:dense", channels=64, spatial=(7, 7), units=2)  # fan-in 3136 > NONZEROS
    x = es.sample_inputs(spec, None, "bfloat16", np.random.default_rng(0))
    n = 64 * 49
    assert len(x) == es.detection_batch(spec) == math.ceil(es.COVERAGE * n / es.NONZEROS)
    nonzero = x.reshape(len(x), -1).astype(np.float64) != 0
    assert nonzero.sum(axis=1).max() <= es.NONZEROS
    assert nonzero.sum(axis=0).min() >= es.COVERAGE  # every position non-zero in COVERAGE samples
    values = np.abs(x.astype(np.float64)[x.astype(np.float64) != 0])
    assert values.min() >= 0.49 and values.max() <= 1.51  # never near zero


def test_small_fan_in_inputs_are_dense_and_native_layout_is_the_specs():
    spec = ec.spec("keras:conv", channels=3, spatial=(4, 5), units=2, kernel_size=(2, 2))
    x = es.sample_inputs(spec, None, "float32", np.random.default_rng(1), layout="native")
    assert x.shape == (es.MIN_BATCH, 4, 5, 3)
    assert np.all(x != 0)
    with pytest.raises(SpecError, match="layout='NHWC'"):
        es.sample_inputs(spec, 2, "float32", np.random.default_rng(1), layout="NHWC")


def test_strategies_compose_with_st():
    strategy = es.dense_specs(max_channels=2, max_side=2, max_units=2).flatmap(
        lambda s: st.tuples(st.just(s), es.weights(s), es.inputs(s, batch=2)))
    s, (kernel, _), x = find(strategy, lambda t: True)
    assert kernel.shape == s.kernel_shape and x.shape == (2, *s.input_shape)

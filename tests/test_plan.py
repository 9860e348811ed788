"""The planner: every route, checked by running both layers with the numpy reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck import ConvSpec, DenseSpec, NoMapping
from equivcheck.backends.numpy import forward
from equivcheck.specs import spatial_letters

FORMATS = ("channels_first", "channels_last")


def run(spec, kernel, bias, x_cf):
    """Forward on a channels-first map; the output back in channels-first, dense as (n, units)."""
    x = np.moveaxis(x_cf, 1, -1) if spec.data_format == "channels_last" else x_cf
    y = forward(spec, kernel, bias, x)
    if y.ndim > 2 and spec.data_format == "channels_last":
        y = np.moveaxis(y, -1, 1)
    return y


def assert_same_function(src, dst, *, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(src.kernel_shape)
    bias = rng.standard_normal(src.bias_shape)
    new_kernel, new_bias = ec.convert(src, dst, kernel, bias)
    conv = dst if isinstance(dst, ConvSpec) else src
    x = rng.standard_normal((batch, src.channels, *conv.spatial))
    if isinstance(src, DenseSpec) and src.rank == 0 and isinstance(dst, ConvSpec):
        ys = run(src, kernel, bias, np.moveaxis(x, 1, -1).reshape(-1, src.channels))
        yd = np.moveaxis(run(dst, new_kernel, new_bias, x), 1, -1).reshape(ys.shape)
    elif isinstance(dst, DenseSpec) and dst.rank == 0 and isinstance(src, ConvSpec):
        yd = run(dst, new_kernel, new_bias, np.moveaxis(x, 1, -1).reshape(-1, src.channels))
        ys = np.moveaxis(run(src, kernel, bias, x), 1, -1).reshape(yd.shape)
    else:
        ys, yd = run(src, kernel, bias, x), run(dst, new_kernel, new_bias, x)
        ys, yd = ys.reshape(batch, -1), yd.reshape(batch, -1)
    np.testing.assert_allclose(yd, ys, rtol=1e-10, atol=1e-10)


def layouts(rank, transposed=False):
    letters = spatial_letters(rank)
    return st.permutations("OI" + letters).map("".join)


@st.composite
def dense_specs(draw, channels, spatial, units):
    letters = "C" + spatial_letters(len(spatial))
    return DenseSpec(
        channels, spatial, units,
        data_format=draw(st.sampled_from(FORMATS)),
        flatten=draw(st.permutations(letters).map("".join)) if spatial else None,
        kernel_layout=draw(st.sampled_from(["IO", "OI"])),
    )


@st.composite
def conv_specs(draw, channels, units, kernel_size, spatial, **kw):
    return ConvSpec(
        channels, units, kernel_size, spatial=spatial,
        data_format=draw(st.sampled_from(FORMATS)),
        kernel_layout=draw(layouts(len(kernel_size))),
        op=draw(st.sampled_from(["correlate", "convolve"])),
        **kw,
    )


shapes = st.tuples(st.integers(1, 3), st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), st.integers(1, 3))


@given(shapes, st.data())
def test_dense_to_conv_covering_the_map(shape, data):
    c, sp, n = shape
    src = data.draw(dense_specs(c, sp, n))
    dst = data.draw(conv_specs(c, n, sp, sp, stride=data.draw(st.integers(1, 3))))
    assert_same_function(src, dst)
    assert_same_function(dst, src)


@given(shapes, st.data())
def test_dense_to_dense_between_flatten_orders(shape, data):
    c, sp, n = shape
    assert_same_function(data.draw(dense_specs(c, sp, n)), data.draw(dense_specs(c, sp, n)))


@given(st.integers(1, 4), st.integers(1, 4), st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_dense_to_pointwise_conv(c, n, spatial, data):
    src = DenseSpec(c, (), n, kernel_layout=data.draw(st.sampled_from(["IO", "OI"])))
    dst = data.draw(conv_specs(c, n, (1,) * len(spatial), tuple(spatial)))
    assert_same_function(src, dst)
    assert_same_function(dst, src)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.data())
def test_conv_to_conv_across_layouts_and_ops(g, cin, cout, data):
    rank = data.draw(st.integers(1, 3))
    ks = tuple(data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    spatial = tuple(k + data.draw(st.integers(0, 3)) for k in ks)
    kw = dict(
        stride=data.draw(st.integers(1, 2)), dilation=data.draw(st.integers(1, 2)),
        padding=data.draw(st.sampled_from(["valid", "same", 1])), groups=g,
    )
    if kw["padding"] == "same" or kw["dilation"] > 1:
        spatial = tuple(s + 2 * k for s, k in zip(spatial, ks))
    src = data.draw(conv_specs(g * cin, g * cout, ks, spatial, **kw))
    dst = data.draw(conv_specs(g * cin, g * cout, ks, spatial, **kw))
    assert_same_function(src, dst)


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.data())
def test_transposed_conv_across_layouts(g, cin, cout, data):
    ks = tuple(data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=2)))
    kw = dict(stride=data.draw(st.integers(1, 2)), padding=data.draw(st.integers(0, 1)), groups=g, transposed=True)
    src = data.draw(conv_specs(g * cin, g * cout, ks, (3, 4), **kw))
    dst = data.draw(conv_specs(g * cin, g * cout, ks, (3, 4), **kw))
    assert_same_function(src, dst)


@pytest.mark.parametrize("rank", [1, 2])
def test_depthwise_layout_to_grouped(rank):
    ks = (3,) * rank
    src = ec.spec("keras:depthwise", channels=4, spatial=(5,) * rank, kernel_size=ks, multiplier=2)
    dst = ec.spec("torch:conv", channels=4, spatial=(5,) * rank, units=8, kernel_size=ks, groups=4)
    assert src.kernel_shape == (*ks, 4, 2)
    assert_same_function(src, dst)
    assert_same_function(dst, src)


def test_bias_is_carried_or_zeroed():
    src = ec.spec("keras:dense", channels=2, spatial=(2,), units=3, bias=False)
    dst = ec.spec("torch:conv", channels=2, spatial=(2,), units=3)
    k, b = ec.convert(src, dst, np.ones(src.kernel_shape), None)
    np.testing.assert_array_equal(b, np.zeros(3))
    with pytest.raises(NoMapping, match="no bias but the source bias is not zero"):
        ec.convert(dst, src, k, np.ones(3))
    assert ec.convert(dst, src, k, np.zeros(3))[1] is None


@pytest.mark.parametrize(
    "dst_kwargs, match",
    [
        (dict(kernel_size=(3, 3)), r"kernel_size=\(3, 3\) is smaller than the map spatial=\(7, 7\)"),
        (dict(groups=2), r"groups=2: a dense layer mixes every input channel"),
        (dict(padding="same"), r"padding='same'"),
    ],
)
def test_impossible_routes_say_why(dst_kwargs, match):
    src = ec.spec("keras:dense", channels=4, spatial=(7, 7), units=6)
    dst = ec.spec("torch:conv", channels=4, spatial=(7, 7), units=6, **dst_kwargs)
    with pytest.raises(NoMapping, match=match) as info:
        ec.plan(src, dst)
    assert "\n" not in str(info.value)


def test_pointwise_with_stride_skips_inputs():
    src = ec.spec("torch:dense", channels=4, units=6)
    dst = ec.spec("torch:conv", channels=4, spatial=(5, 5), units=6, kernel_size=(1, 1), stride=2)
    with pytest.raises(NoMapping, match="stride 1"):
        ec.plan(src, dst)


def test_conv_to_conv_differing_geometry_is_refused():
    a = ec.spec("keras:conv", channels=4, spatial=(9, 9), units=6, kernel_size=(3, 3))
    b = ec.spec("torch:conv", channels=4, spatial=(9, 9), units=6, kernel_size=(3, 3), stride=2)
    with pytest.raises(NoMapping, match=r"stride differs \(\(1, 1\) vs \(2, 2\)\)"):
        ec.plan(a, b)


def test_plan_is_cached_and_inverse_is_the_reverse_route():
    a = ec.spec("keras:dense", channels=5, spatial=(3, 4), units=6)
    b = ec.spec("theano:conv", channels=5, spatial=(3, 4), units=6)
    assert ec.plan(a, b) is ec.plan(a, b)
    assert ec.plan(a, b).inverse().equivalent(ec.plan(b, a))

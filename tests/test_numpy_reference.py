"""The numpy reference against a naive per-output-position loop (an independent oracle)."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equivcheck import ConvSpec, DenseSpec
from equivcheck.backends import get
from equivcheck.backends.numpy import forward
from equivcheck.plan import canonical


def naive_conv(spec: ConvSpec, kernel, bias, x_cf):
    """Textbook definition, channels-first, one output element at a time."""
    k = canonical(spec).apply(kernel)  # correlation form
    n, g = x_cf.shape[0], spec.groups
    pads = spec.pads()
    xp = np.pad(x_cf, [(0, 0), (0, 0), *pads])
    out_sp = spec.output_spatial
    y = np.zeros((n, spec.out_channels, *out_sp))
    if spec.transposed:
        cin, cout = spec.in_channels // g, spec.out_channels // g
        full = np.zeros((n, spec.out_channels, *[o + lo + hi for o, (lo, hi) in zip(out_sp, pads)]))
        for b, i in itertools.product(range(n), range(spec.in_channels)):
            grp = i // cin
            for q in itertools.product(*(range(s) for s in spec.spatial)):
                for kp in itertools.product(*(range(s) for s in spec.kernel_size)):
                    p = tuple(qq * s + kk * d for qq, s, kk, d in zip(q, spec.stride, kp, spec.dilation))
                    if all(pp < f for pp, f in zip(p, full.shape[2:])):
                        for o in range(cout):
                            full[(b, grp * cout + o, *p)] += x_cf[(b, i, *q)] * k[(i, o, *kp)]
        crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(pads, out_sp))
        y = full[(slice(None), slice(None), *crop)]
    else:
        cin, cout = spec.in_channels // g, spec.out_channels // g
        for b, o in itertools.product(range(n), range(spec.out_channels)):
            grp = o // cout
            for pos in itertools.product(*(range(s) for s in out_sp)):
                acc = 0.0
                for c in range(cin):
                    for kp in itertools.product(*(range(s) for s in spec.kernel_size)):
                        src = tuple(p * s + kk * d for p, s, kk, d in zip(pos, spec.stride, kp, spec.dilation))
                        acc += xp[(b, grp * cin + c, *src)] * k[(o, c, *kp)]
                y[(b, o, *pos)] = acc
    if bias is not None:
        y = y + bias.reshape(-1, *(1,) * spec.rank)
    return y


@st.composite
def small_convs(draw):
    rank = draw(st.integers(1, 3))
    g = draw(st.integers(1, 2))
    ks = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    transposed = draw(st.booleans())
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["valid", 1] + ([] if transposed else ["same"])))
    spatial = tuple(draw(st.integers(1, 3)) + (k - 1) * dilation + 2 for k in ks)
    out_pad = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    return ConvSpec(
        g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2)), ks, spatial=spatial, stride=stride,
        dilation=dilation, padding=padding, groups=g, transposed=transposed, output_padding=out_pad,
        data_format=draw(st.sampled_from(["channels_first", "channels_last"])),
        op=draw(st.sampled_from(["correlate", "convolve"])),
    )


@given(small_convs(), st.booleans())
def test_conv_matches_the_naive_definition(spec, with_bias):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(spec.kernel_shape)
    bias = rng.standard_normal(spec.bias_shape) if with_bias else None
    x_cf = rng.standard_normal((2, spec.in_channels, *spec.spatial))
    x = np.moveaxis(x_cf, 1, -1) if spec.data_format == "channels_last" else x_cf
    y = forward(spec, kernel, bias, x)
    if spec.data_format == "channels_last":
        y = np.moveaxis(y, -1, 1)
    np.testing.assert_allclose(y, naive_conv(spec, kernel, bias, x_cf), rtol=1e-10, atol=1e-10)


def test_convolve_flips_the_kernel_like_scipy():
    signal = pytest.importorskip("scipy.signal", reason="scipy not installed")
    rng = np.random.default_rng(1)
    x, k = rng.standard_normal((1, 1, 6, 7)), rng.standard_normal((1, 1, 3, 2))
    for op, fn in (("convolve", signal.convolve), ("correlate", signal.correlate)):
        spec = ConvSpec(1, 1, (3, 2), spatial=(6, 7), op=op)
        np.testing.assert_allclose(forward(spec, k, None, x)[0, 0], fn(x[0, 0], k[0, 0], mode="valid"), atol=1e-12)


def test_dense_flatten_order_and_kernel_layout():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 4, 5))  # channels-first map
    w = rng.standard_normal((40, 6))
    spec = DenseSpec(2, (4, 5), 6, data_format="channels_first", flatten="HWC")
    expected = np.moveaxis(x, 1, -1).reshape(3, -1) @ w
    np.testing.assert_allclose(forward(spec, w, None, x), expected)
    np.testing.assert_allclose(forward(spec.replace(kernel_layout="OI"), w.T, None, x), expected)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_every_dtype_runs_and_keeps_its_dtype(dtype):
    spec = ConvSpec(2, 3, (3, 3), spatial=(5, 5))
    layer = get("numpy").build(spec, dtype)
    rng = np.random.default_rng(3)
    layer.set_weights(rng.standard_normal(spec.kernel_shape), rng.standard_normal(3))
    x = rng.standard_normal((1, 2, 5, 5))
    y = layer(x)
    assert y.dtype.name == dtype and y.shape == (1, 3, 3, 3)
    exact = forward(spec, *[a.astype(np.float64) for a in layer.get_weights()], x.astype(layer.kernel.dtype).astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), exact, rtol=1e-2 if dtype in ("float16", "bfloat16") else 1e-6, atol=1e-2)

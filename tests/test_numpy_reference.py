"""The numpy reference against the textbook definitions, written out here (an independent oracle).

Nothing in this file calls :mod:`equivcheck.plan`, :mod:`equivcheck.mapping` or a backend's
layout mapping. Every preset's data format, flatten order, kernel layout and flip is this
file's own table of what the frameworks document (``DOCUMENTED``), and every output element
is computed in float64 by explicit index arithmetic: loops over output channels, output
positions, input channels and kernel taps, reading the stored kernel through its layout
letters and the input map through its data format. The presets' specs are only asked for
the kernel they expect and the output they promise, and both are checked against the table.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck import ConvSpec, DenseSpec
from equivcheck.backends import get
from equivcheck.backends.numpy import forward

SPATIAL = {0: "", 1: "W", 2: "HW", 3: "DHW"}


# -- what each framework documents ---------------------------------------------------------
@dataclass(frozen=True)
class Documented:
    """One system's conventions, written for 2-D maps (``HW``); 1-D uses ``W`` and 3-D ``DHW``.

    ``flatten``: the order in which Flatten linearises the map (its letters, row-major);
    ``dense``: ``"IO"`` for a weight stored (in_features, units), ``"OI"`` for (units, in_features).
    Conv layouts: ``O``/``I`` are per-slice channel counts as the framework stores them; a depthwise
    ``M`` is the channel multiplier, and output channel ``c * M + m`` reads input channel ``c``.
    ``flipped``: true convolution (the kernel read mirrored in space).
    """

    data_format: str
    flatten: str
    dense: str
    conv: str
    transpose: str | None
    depthwise: str | None
    flipped: bool = False
    transpose_flipped: bool = False

    def layers(self) -> tuple[str, ...]:
        return ("dense", "conv") + ("conv_transpose",) * bool(self.transpose) + ("depthwise",) * bool(self.depthwise)


CF, CL = "channels_first", "channels_last"
DOCUMENTED = {
    # Keras 3: Flatten moves channels last; Dense kernel (in, units); Conv kernel (h, w, in, out);
    # ConvTranspose kernel (h, w, out, in); DepthwiseConv kernel (h, w, in, multiplier).
    "keras": Documented(CL, "HWC", "IO", "HWIO", "HWOI", "HWIM"),
    "keras_cf": Documented(CF, "HWC", "IO", "HWIO", "HWOI", "HWIM"),
    # tf.nn: NHWC; filters (h, w, in, out); conv_transpose filters (h, w, out, in); depthwise (h, w, in, mult).
    "tf": Documented(CL, "HWC", "IO", "HWIO", "HWOI", "HWIM"),
    # PyTorch: NCHW; Linear weight (out, in); Conv (out, in/groups, h, w); ConvTranspose (in, out/groups, h, w);
    # depthwise = Conv with groups=in: (in*mult, 1, h, w).
    "torch": Documented(CF, "CHW", "OI", "OIHW", "IOHW", "OIHW"),
    # lax.conv_general_dilated default dimension numbers (NCHW, OIHW); x.reshape(n, -1) @ w.
    "jax": Documented(CF, "CHW", "IO", "OIHW", "IOHW", "OIHW"),
    # Flax linen: NHWC; Dense (in, out); Conv (h, w, in/groups, out); depthwise = feature_group_count:
    # (h, w, 1, in*mult); ConvTranspose (h, w, in, out) through lax.conv_transpose(transpose_kernel=False),
    # which equals a gradient-style transposed conv with the kernel mirrored.
    "flax": Documented(CL, "HWC", "IO", "HWIO", "HWIO", "HWIO", transpose_flipped=True),
    # ONNX as torch exports it: Gemm transB=1 (out, in); Conv W (M, C/group, kH, kW); ConvTranspose W (C, M/group, ...).
    "onnx": Documented(CF, "CHW", "OI", "OIHW", "IOHW", "OIHW"),
    # tf2onnx from Keras: NHWC input flattened HWC; Dense as MatMul (in, out) + Add; Conv W (M, C/group, kH, kW)
    # and ConvTranspose W (C, M/group, ...) as ONNX defines them, with Transposes around the node.
    "tf2onnx": Documented(CL, "HWC", "IO", "OIHW", "IOHW", "OIHW"),
    # Caffe: InnerProduct (out, in); Convolution (out, in/group, h, w); Deconvolution (in, out/group, h, w).
    "caffe": Documented(CF, "CHW", "OI", "OIHW", "IOHW", "OIHW"),
    # TFLite: NHWC; FullyConnected (out, in); Conv2D (out, h, w, in); TransposeConv (out, h, w, in);
    # DepthwiseConv2D (1, h, w, in*mult).
    "tflite": Documented(CL, "HWC", "OI", "OHWI", "OHWI", "IHWO"),
    # Keras 1 on Theano ('th'): NCHW, Flatten in CHW order, Dense (in, out), kernel (out, in, h, w), flipped.
    "theano": Documented(CF, "CHW", "IO", "OIHW", None, None, flipped=True),
    # scipy.signal.convolve per channel pair: NCHW, flipped, kernel (out, in, h, w); dense (in, out).
    "scipy": Documented(CF, "CHW", "IO", "OIHW", None, "OIHW", flipped=True),
}


def letters(layout_2d: str, rank: int) -> str:
    """A documented 2-D layout at ``rank``: ``"OIHW"`` → ``"OIW"`` / ``"OIDHW"``."""
    return layout_2d.replace("HW", SPATIAL[rank])


# -- padding and sizes, as the frameworks define them ---------------------------------------
def pads_of(padding, spatial, kernel_size, stride, dilation) -> list[tuple[int, int]]:
    """(before, after) per axis: ``valid`` none; ``same`` as TensorFlow (extra one after); ints both sides."""
    rank = len(kernel_size)
    if padding == "valid":
        return [(0, 0)] * rank
    if padding == "same":
        out = []
        for n, k, s, d in zip(spatial, kernel_size, stride, dilation):
            span = (k - 1) * d + 1
            total = max((-(-n // s) - 1) * s + span - n, 0)
            out.append((total // 2, total - total // 2))
        return out
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]


def per_axis(value, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


# -- reading maps and kernels by their letters ---------------------------------------------
def pixel(x: np.ndarray, c: int, pos: tuple[int, ...], data_format: str) -> np.ndarray:
    """Channel ``c`` at ``pos`` of every sample (a batch vector)."""
    return x[(slice(None), *pos, c)] if data_format == CL else x[(slice(None), c, *pos)]


def plane(x: np.ndarray, c: int, data_format: str) -> np.ndarray:
    """Channel ``c`` of every sample: (batch, *spatial)."""
    return x[..., c] if data_format == CL else x[:, c]


def weight(kernel: np.ndarray, layout: str, taps: tuple[int, ...], **channels: int) -> float:
    """``kernel`` read through its layout letters: ``channels`` gives O/I/M, ``taps`` the spatial letters."""
    where = dict(zip(SPATIAL[len(taps)], taps), **channels)
    return kernel[tuple(where[a] for a in layout)]


def kernel_sizes(layout: str, kernel_size: tuple[int, ...], **channels: int) -> tuple[int, ...]:
    sizes = dict(zip(SPATIAL[len(kernel_size)], kernel_size), **channels)
    return tuple(sizes[a] for a in layout)


def mirrored(taps: tuple[int, ...], kernel_size: tuple[int, ...], flipped: bool) -> tuple[int, ...]:
    return tuple(k - 1 - t for t, k in zip(taps, kernel_size)) if flipped else taps


def hits(positions: list[np.ndarray], sizes: tuple[int, ...]):
    """Per axis, which of ``positions`` fall inside ``0..size-1`` (outside: padding), as index grids."""
    inside = [(p >= 0) & (p < n) for p, n in zip(positions, sizes)]
    if not all(m.any() for m in inside):
        return None
    return np.ix_(*(np.flatnonzero(m) for m in inside)), np.ix_(*(p[m] for p, m in zip(positions, inside)))


# -- the textbook layers ---------------------------------------------------------------------
def expected_dense(x, kernel, bias, *, channels, spatial, units, data_format, flatten, dense) -> np.ndarray:
    """``y[u] = b[u] + Σ x[c, pos] · W[f, u]``, ``f`` the row-major index of (c, pos) in ``flatten`` order."""
    sizes = dict(zip("C" + SPATIAL[len(spatial)], (channels, *spatial)))
    y = np.zeros((x.shape[0], units)) + (0.0 if bias is None else bias)
    for c in range(channels):
        for pos in itertools.product(*map(range, spatial)):
            coords = dict(zip("C" + SPATIAL[len(spatial)], (c, *pos)))
            f = 0
            for a in flatten:
                f = f * sizes[a] + coords[a]
            row = kernel[f, :] if dense == "IO" else kernel[:, f]  # W[f, u] for every unit u
            y += pixel(x, c, pos, data_format)[:, None] * row[None, :]
    return y


def conv_weights(kernel, layout, *, cin, cout, groups, kernel_size, flipped, transposed):
    """The kernel as ``w[o, i_in_group, *taps]`` (``w[i, o_in_group, *taps]`` transposed), read by letters."""
    depthwise_im = "M" in layout
    if transposed:
        shape, outer, inner = (cin, cout // groups, *kernel_size), cin, cout // groups
    else:
        shape, outer, inner = (cout, cin // groups, *kernel_size), cout, cin // groups
    w = np.zeros(shape)
    for a, b in itertools.product(range(outer), range(inner)):
        for taps in itertools.product(*map(range, kernel_size)):
            read = mirrored(taps, kernel_size, flipped)
            if depthwise_im:  # output channel a = c * M + m reads input channel c
                mult = cout // cin
                w[(a, b, *taps)] = weight(kernel, layout, read, I=a // mult, M=a % mult)
            elif transposed:
                w[(a, b, *taps)] = weight(kernel, layout, read, I=a, O=b)
            else:
                w[(a, b, *taps)] = weight(kernel, layout, read, O=a, I=b)
    return w


def expected_conv(x, kernel, bias, *, cin, cout, spatial, kernel_size, stride, dilation, padding, groups,
                  data_format, layout, flipped, transposed=False, output_padding=0) -> np.ndarray:
    """A (transposed) convolution, channels-first out: a loop over channels and kernel taps, each tap
    adding its product at every output position (``out * stride + tap * dilation - pad_before`` read)
    or, transposed, scattering every input position to ``in * stride + tap * dilation - pad_before``."""
    rank = len(kernel_size)
    stride, dilation = per_axis(stride, rank), per_axis(dilation, rank)
    pads = pads_of(padding, spatial, kernel_size, stride, dilation)
    w = conv_weights(kernel, layout, cin=cin, cout=cout, groups=groups, kernel_size=kernel_size,
                     flipped=flipped, transposed=transposed)
    n = x.shape[0]
    per_in, per_out = cin // groups, cout // groups
    if transposed:
        output_padding = per_axis(output_padding, rank)
        out_sp = tuple((i - 1) * s - lo - hi + d * (k - 1) + op + 1 for i, s, d, k, (lo, hi), op
                       in zip(spatial, stride, dilation, kernel_size, pads, output_padding))
        y = np.zeros((n, cout, *out_sp))
        for taps in itertools.product(*map(range, kernel_size)):
            dst = [np.arange(size) * s + t * d - lo for size, s, t, d, (lo, _) in
                   zip(spatial, stride, taps, dilation, pads)]
            grids = hits(dst, out_sp)
            if grids is None:  # this tap lands only in the cropped padding
                continue
            src, to = grids
            for i in range(cin):
                g, xi = i // per_in, plane(x, i, data_format)[(slice(None), *src)]
                for o in range(per_out):
                    y[:, g * per_out + o][(slice(None), *to)] += xi * w[(i, o, *taps)]
    else:
        out_sp = tuple((i + lo + hi - d * (k - 1) - 1) // s + 1 for i, s, d, k, (lo, hi)
                       in zip(spatial, stride, dilation, kernel_size, pads))
        y = np.zeros((n, cout, *out_sp))
        for taps in itertools.product(*map(range, kernel_size)):
            src = [np.arange(size) * s + t * d - lo for size, s, t, d, (lo, _) in
                   zip(out_sp, stride, taps, dilation, pads)]
            grids = hits(src, spatial)
            if grids is None:  # every read of this tap is padding
                continue
            to, read = grids
            for o in range(cout):
                g = o // per_out
                for ci in range(per_in):
                    xi = plane(x, g * per_in + ci, data_format)[(slice(None), *read)]
                    y[:, o][(slice(None), *to)] += xi * w[(o, ci, *taps)]
    if bias is not None:
        for o in range(cout):
            y[:, o] += bias[o]
    return y


def channels_first(y: np.ndarray, data_format: str) -> np.ndarray:
    return np.moveaxis(y, -1, 1) if data_format == CL and y.ndim > 2 else y


# -- every preset, every layer ---------------------------------------------------------------
DENSE = {
    "2d": dict(channels=3, spatial=(2, 4), units=5),
    "1d": dict(channels=2, spatial=(5,), units=3),
    "3d": dict(channels=2, spatial=(2, 3, 2), units=2, bias=False),
    "flat": dict(channels=6, spatial=(), units=3),
    "flatten WCH": dict(channels=3, spatial=(2, 4), units=2, flatten="WCH"),
}
CONV = {
    "2d valid": dict(channels=3, spatial=(5, 4), units=2, kernel_size=(3, 2)),
    "covers the map": dict(channels=2, spatial=(3, 2), units=3),
    "stride dilation same": dict(channels=2, spatial=(7, 6), units=3, kernel_size=(3, 2), stride=(2, 1),
                                 dilation=(1, 2), padding="same"),
    "same stride 2 odd": dict(channels=2, spatial=(5, 6), units=2, kernel_size=(2, 3), stride=2, padding="same"),
    "int padding groups": dict(channels=4, spatial=(4, 5), units=6, kernel_size=(3, 3), padding=1, groups=2),
    "pairs padding no bias": dict(channels=2, spatial=(5, 4), units=2, kernel_size=(2, 3), stride=2,
                                  padding=((1, 0), (0, 2)), bias=False),
    "1d": dict(channels=2, spatial=(9,), units=3, kernel_size=(3,), stride=2, dilation=2, padding="same"),
    "3d groups": dict(channels=2, spatial=(3, 4, 3), units=4, kernel_size=(2, 2, 2), padding=1, groups=2),
}
TRANSPOSE = {
    "2d": dict(channels=3, spatial=(3, 4), units=2, kernel_size=(3, 2)),
    "stride padding output_padding": dict(channels=2, spatial=(3, 3), units=3, kernel_size=(3, 3), stride=2,
                                          padding=1, output_padding=1),
    "dilation per axis": dict(channels=2, spatial=(2, 3), units=2, kernel_size=(2, 3), stride=(2, 3),
                              dilation=2, padding=(0, 1), output_padding=(1, 2)),
    "groups no bias": dict(channels=4, spatial=(3, 2), units=6, kernel_size=(2, 2), stride=2, groups=2, bias=False),
    "1d": dict(channels=2, spatial=(4,), units=3, kernel_size=(3,), stride=3, dilation=2, padding=2,
               output_padding=2),
    "3d": dict(channels=2, spatial=(2, 3, 2), units=2, kernel_size=(2, 2, 2), stride=(1, 2, 2)),
}
DEPTHWISE = {
    "2d": dict(channels=3, spatial=(4, 5), kernel_size=(3, 3)),
    "multiplier stride same": dict(channels=2, spatial=(5, 5), kernel_size=(3, 2), multiplier=2, stride=2,
                                   padding="same"),
    "1d dilation": dict(channels=3, spatial=(8,), kernel_size=(3,), multiplier=3, dilation=2, padding=1),
    "3d no bias": dict(channels=2, spatial=(3, 3, 4), kernel_size=(2, 1, 2), multiplier=2, bias=False),
    "units": dict(channels=2, spatial=(4, 4), kernel_size=(2, 2), units=4, padding=((0, 1), (1, 0))),
}
SHAPES = {"dense": DENSE, "conv": CONV, "conv_transpose": TRANSPOSE, "depthwise": DEPTHWISE}
FORMATS = ("own", "other")  # the preset's data format, and the other one given as an override


def preset_cases():
    for preset, doc in DOCUMENTED.items():
        for layer in doc.layers():
            for shape in SHAPES[layer]:
                yield pytest.param(preset, layer, shape, id=f"{preset}:{layer}-{shape}")


def test_the_table_documents_every_preset_and_its_layers():
    assert set(DOCUMENTED) == set(ec.PRESETS), "a preset without a documented oracle (or one removed)"
    for name, doc in DOCUMENTED.items():
        assert ec.PRESETS[name].layers() == doc.layers(), name


@pytest.mark.parametrize("preset, layer, shape", list(preset_cases()))
def test_every_preset_layer_matches_its_documented_layout(preset, layer, shape):
    for fmt in FORMATS:
        check_documented(preset, layer, shape, fmt)


def check_documented(preset: str, layer: str, shape: str, fmt: str) -> None:
    """The reference on one preset layer (in its own data format or the other) against the oracle."""
    doc = DOCUMENTED[preset]
    kw = dict(SHAPES[layer][shape])
    data_format = doc.data_format if fmt == "own" else (CF if doc.data_format == CL else CL)
    overrides = {} if fmt == "own" else {"data_format": data_format}
    flatten = kw.pop("flatten", None)
    if flatten is not None:
        overrides["flatten"] = flatten
    spec = ec.spec(f"{preset}:{layer}", **kw, **overrides)
    where = f"{spec.describe()} ({shape}, {fmt} data format)"
    assert spec.data_format == data_format, where
    rank = len(kw["spatial"])
    has_bias = kw.get("bias", True)
    rng = np.random.default_rng(zlib.crc32(f"{preset}:{layer}-{shape}-{fmt}".encode()))
    c = kw["channels"]
    if layer == "dense":
        sp, units = kw["spatial"], kw["units"]
        order = flatten or letters(doc.flatten, rank)
        features = c * int(np.prod(sp))
        kshape = (features, units) if doc.dense == "IO" else (units, features)
        x = rng.standard_normal((2, *((c, *sp) if data_format == CF else (*sp, c))))
        kernel, bias = rng.standard_normal(kshape), rng.standard_normal(units) if has_bias else None
        assert (spec.kernel_shape, spec.flatten) == (kshape, order), where
        expected = expected_dense(x, kernel, bias, channels=c, spatial=sp, units=units, data_format=data_format,
                                  flatten=order, dense=doc.dense)
        got = forward(spec, kernel, bias, x)
    else:
        sp = kw["spatial"]
        ks = kw.get("kernel_size", sp)
        groups = kw.get("groups", 1)
        transposed = layer == "conv_transpose"
        flipped = doc.transpose_flipped if transposed else doc.flipped
        if layer == "depthwise":
            mult = kw.get("multiplier") or kw.get("units", c) // c
            cout, groups = c * mult, c
            layout = letters(doc.depthwise, rank)
            channel_sizes = dict(I=c, M=mult) if "M" in layout else dict(O=cout, I=1)
        else:
            cout = kw["units"]
            layout = letters(doc.transpose if transposed else doc.conv, rank)
            channel_sizes = dict(I=c, O=cout // groups) if transposed else dict(O=cout, I=c // groups)
        kshape = kernel_sizes(layout, ks, **channel_sizes)
        assert spec.kernel_shape == kshape, f"{where}: documented {layout} {kshape}"
        x = rng.standard_normal((2, *((c, *sp) if data_format == CF else (*sp, c))))
        kernel, bias = rng.standard_normal(kshape), rng.standard_normal(cout) if has_bias else None
        expected = expected_conv(
            x, kernel, bias, cin=c, cout=cout, spatial=sp, kernel_size=ks, stride=kw.get("stride", 1),
            dilation=kw.get("dilation", 1), padding=kw.get("padding", "valid"), groups=groups,
            data_format=data_format, layout=layout, flipped=flipped, transposed=transposed,
            output_padding=kw.get("output_padding", 0))
        assert spec.output_shape == (expected.shape[1:] if data_format == CF
                                     else (*expected.shape[2:], expected.shape[1])), where
        got = channels_first(forward(spec, kernel, bias, x), data_format)
    assert got.shape == expected.shape, where
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10, err_msg=where)


def test_the_oracle_tells_each_documented_layout_from_its_neighbours():
    """The oracle itself is sensitive: reading a kernel by the wrong letters or without the flip disagrees."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    kernel = rng.standard_normal((2, 3, 3, 3))  # square, so OIHW / OIWH / IOHW-like misreadings fit
    common = dict(cin=3, cout=2, spatial=(4, 5), kernel_size=(3, 3), stride=1, dilation=1, padding="valid",
                  groups=1, data_format=CF)
    right = expected_conv(x, kernel, None, layout="OIHW", flipped=False, **common)
    for layout, flipped in (("OIWH", False), ("OIHW", True)):
        assert not np.allclose(right, expected_conv(x, kernel, None, layout=layout, flipped=flipped, **common))
    spec = ConvSpec(3, 2, (3, 3), spatial=(4, 5), kernel_layout="OIWH")
    np.testing.assert_allclose(forward(spec, kernel, None, x),
                               expected_conv(x, kernel, None, layout="OIWH", flipped=False, **common), atol=1e-12)


# -- any spec, any layout ----------------------------------------------------------------------
@st.composite
def small_convs(draw):
    rank = draw(st.integers(1, 3))
    g = draw(st.integers(1, 2))
    ks = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    transposed = draw(st.booleans())
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    pairs = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(rank))
    padding = draw(st.sampled_from(["valid", 1] + ([] if transposed else ["same", pairs])))
    spatial = tuple(draw(st.integers(1, 3)) + (k - 1) * dilation + 2 for k in ks)
    out_pad = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    letters_ = SPATIAL[rank]
    depthwise = not transposed and draw(st.booleans())
    if depthwise:  # groups == in_channels, a (.., I, M, ..) layout in any order
        cin = draw(st.integers(1, 3))
        cout, g = cin * draw(st.integers(1, 2)), cin
        layout = "".join(draw(st.permutations("IM" + letters_)))
    else:
        cin, cout = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2))
        layout = "".join(draw(st.permutations("OI" + letters_)))
    return ConvSpec(
        cin, cout, ks, spatial=spatial, stride=stride, dilation=dilation, padding=padding, groups=g,
        transposed=transposed, output_padding=out_pad, kernel_layout=layout,
        data_format=draw(st.sampled_from([CF, CL])), op=draw(st.sampled_from(["correlate", "convolve"])),
    )


@given(small_convs(), st.booleans())
def test_conv_matches_the_naive_definition(spec, with_bias):
    rng = np.random.default_rng(0)
    letters_ = SPATIAL[spec.rank]
    if "M" in spec.kernel_layout:
        channel_sizes = dict(I=spec.in_channels, M=spec.out_channels // spec.in_channels)
    elif spec.transposed:
        channel_sizes = dict(I=spec.in_channels, O=spec.out_channels // spec.groups)
    else:
        channel_sizes = dict(O=spec.out_channels, I=spec.in_channels // spec.groups)
    kshape = kernel_sizes(spec.kernel_layout, spec.kernel_size, **channel_sizes)
    assert spec.kernel_shape == kshape and set(spec.kernel_layout) - set(channel_sizes) == set(letters_)
    kernel = rng.standard_normal(kshape)
    bias = rng.standard_normal(spec.out_channels) if with_bias else None
    cf = spec.data_format == CF
    x = rng.standard_normal((2, *((spec.in_channels, *spec.spatial) if cf else (*spec.spatial, spec.in_channels))))
    expected = expected_conv(
        x, kernel, bias, cin=spec.in_channels, cout=spec.out_channels, spatial=spec.spatial,
        kernel_size=spec.kernel_size, stride=spec.stride, dilation=spec.dilation, padding=spec.padding,
        groups=spec.groups, data_format=spec.data_format, layout=spec.kernel_layout, flipped=spec.op == "convolve",
        transposed=spec.transposed, output_padding=spec.output_padding)
    y = channels_first(forward(spec, kernel, bias, x), spec.data_format)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


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
    np.testing.assert_allclose(expected_dense(x, w, None, channels=2, spatial=(4, 5), units=6, data_format=CF,
                                              flatten="HWC", dense="IO"), expected)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_every_dtype_runs_and_keeps_its_dtype(dtype):
    spec = ConvSpec(2, 3, (3, 3), spatial=(5, 5))
    layer = get("numpy").build(spec, dtype)
    rng = np.random.default_rng(3)
    layer.set_weights(rng.standard_normal(spec.kernel_shape), rng.standard_normal(3))
    x = rng.standard_normal((1, 2, 5, 5))
    y = layer(x)
    assert y.dtype.name == dtype and y.shape == (1, 3, 3, 3)
    kernel, bias = (a.astype(np.float64) for a in layer.get_weights())
    exact = expected_conv(x.astype(layer.kernel.dtype).astype(np.float64), kernel, bias, cin=2, cout=3,
                          spatial=(5, 5), kernel_size=(3, 3), stride=1, dilation=1, padding="valid", groups=1,
                          data_format=CF, layout="OIHW", flipped=False)
    np.testing.assert_allclose(y.astype(np.float64), exact, rtol=1e-2 if dtype in ("float16", "bfloat16") else 1e-6,
                               atol=1e-2)

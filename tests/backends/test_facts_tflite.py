"""TensorFlow Lite conventions, pinned on the real converter and interpreter against float64 loops written here.

Each fact converts a ``tf.function`` of one TensorFlow op, reads back the constant the converter stored
(its shape and which TensorFlow weight lands where) and runs the interpreter against an independent
float64 computation. The backend's own layers are then checked on the same facts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed: pip install 'equivcheck[tflite]'")

RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _convert(fn, shape):
    """(interpreter, its op names, its float32 constants by shape) for ``fn`` on a fixed input shape."""
    from equivcheck.backends.tflite import interpreter

    f = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)])
    model = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()
    it = interpreter(model)
    io = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    constants = {}
    for d in it.get_tensor_details():
        if d["index"] in io or d["dtype"] != np.float32:
            continue
        try:
            constants[tuple(int(n) for n in d["shape"])] = np.asarray(it.get_tensor(d["index"]))
        except ValueError:
            continue
    ops = [op["op_name"] for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]
    return it, ops, constants


def _invoke(it, x):
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _correlate_nhwc(x, w_hwio, stride, dilation, pads, groups=1):
    """float64 cross-correlation: x (N, H, W, C), w (kh, kw, C/groups, O), pads ((top, bottom), (left, right))."""
    x = np.pad(x.astype(np.float64), [(0, 0), *pads, (0, 0)])
    kh, kw, cg, o = w_hwio.shape
    oh = (x.shape[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[2] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((x.shape[0], oh, ow, o))
    og = o // groups
    for i, j, a, b in itertools.product(range(oh), range(ow), range(kh), range(kw)):
        patch = x[:, i * stride[0] + a * dilation[0], j * stride[1] + b * dilation[1], :]
        for g in range(groups):
            y[:, i, j, g * og:(g + 1) * og] += patch[:, g * cg:(g + 1) * cg] @ w_hwio[a, b, :, g * og:(g + 1) * og]
    return y


def test_fully_connected_weights_are_out_in():
    x, w, b = _randn(2, 12), _randn(12, 5), _randn(5)
    it, ops, constants = _convert(lambda t: tf.matmul(t, tf.constant(w)) + tf.constant(b), [2, 12])
    assert ops == ["FULLY_CONNECTED"], ops
    assert (5, 12) in constants and (12, 5) not in constants, "fact: FULLY_CONNECTED stores its weights (out, in)"
    np.testing.assert_array_equal(constants[(5, 12)], w.T)
    np.testing.assert_allclose(_invoke(it, x), x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)
    assert ec.spec("tflite:dense", channels=12, units=5).kernel_shape == (5, 12), "tflite preset: dense (out, in)"


@pytest.mark.parametrize(("groups", "stride", "dilation", "size"), [(1, (2, 2), (1, 1), 7), (2, (1, 1), (2, 1), 6),
                                                                  (1, (2, 1), (1, 1), 6)])
def test_conv2d_filter_is_ohwi(groups, stride, dilation, size):
    x, w = _randn(2, size, size, 4), _randn(3, 2, 4 // groups, 6)  # TensorFlow's HWIO
    padding = "SAME" if groups == 1 else "VALID"
    it, ops, constants = _convert(lambda t: tf.raw_ops.Conv2D(input=t, filter=tf.constant(w), strides=[1, *stride, 1],
                                                              padding=padding, dilations=[1, *dilation, 1]), list(x.shape))
    assert ops == ["CONV_2D"], ops
    ohwi = (6, 3, 2, 4 // groups)
    assert ohwi in constants, f"fact: CONV_2D stores its filter OHWI {ohwi}: {list(constants)}"
    np.testing.assert_array_equal(constants[ohwi], w.transpose(3, 0, 1, 2))
    pads = ((0, 0), (0, 0))
    if padding == "SAME":  # TensorFlow's "same": the odd pad after
        pads = tuple((t // 2, t - t // 2) for t in (max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
                                                   for s, d, k in zip(stride, dilation, (3, 2))))
    np.testing.assert_allclose(_invoke(it, x), _correlate_nhwc(x, w, stride, dilation, pads, groups), rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: CONV_2D correlates (groups={groups}, stride={stride}, padding={padding})")
    spec = ec.spec("tflite:conv", channels=4, spatial=(size, size), kernel_size=(3, 2), units=6, groups=groups)
    assert spec.kernel_shape == ohwi, "tflite preset: conv OHWI"


def test_depthwise_filter_is_1_h_w_c_times_m():
    x, w = _randn(2, 6, 7, 3), _randn(3, 2, 3, 2)  # TensorFlow's (kh, kw, C, M)
    it, ops, constants = _convert(lambda t: tf.raw_ops.DepthwiseConv2dNative(
        input=t, filter=tf.constant(w), strides=[1, 1, 2, 1], padding="VALID", dilations=[1, 1, 1, 1]), list(x.shape))
    assert ops == ["DEPTHWISE_CONV_2D"], ops
    assert (1, 3, 2, 6) in constants, f"fact: DEPTHWISE_CONV_2D stores (1, kh, kw, C*M): {list(constants)}"
    np.testing.assert_array_equal(constants[(1, 3, 2, 6)], w.reshape(1, 3, 2, 6))
    expected = np.concatenate(
        [_correlate_nhwc(x[..., c:c + 1], w[:, :, c:c + 1, :], (1, 2), (1, 1), ((0, 0), (0, 0))) for c in range(3)], axis=-1)
    np.testing.assert_allclose(_invoke(it, x), expected, rtol=1e-5, atol=1e-5,
                               err_msg="fact: depthwise output channel c*M + m reads input channel c")
    assert ec.spec("tflite:depthwise", channels=3, spatial=(6, 7), kernel_size=(3, 2), multiplier=2).kernel_shape == (1, 3, 2, 6)


def test_transpose_conv_filter_is_ohwi():
    x, w = _randn(2, 3, 4, 4), _randn(3, 2, 5, 4)  # Conv2DBackpropInput's filter: (kh, kw, out, in)
    full = (2 * 2 + 3, 3 * 2 + 2)
    it, ops, constants = _convert(lambda t: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=[2, *full, 5], filter=tf.constant(w), out_backprop=t, strides=[1, 2, 2, 1], padding="VALID"),
        list(x.shape))
    assert ops == ["TRANSPOSE_CONV"], ops
    assert (5, 3, 2, 4) in constants, f"fact: TRANSPOSE_CONV stores its filter OHWI: {list(constants)}"
    np.testing.assert_array_equal(constants[(5, 3, 2, 4)], w.transpose(2, 0, 1, 3))
    expected = np.zeros((2, *full, 5))
    for i, j, a, b in itertools.product(range(3), range(4), range(3), range(2)):
        expected[:, 2 * i + a, 2 * j + b, :] += x[:, i, j, :].astype(np.float64) @ w[a, b].T
    np.testing.assert_allclose(_invoke(it, x), expected, rtol=1e-5, atol=1e-5,
                               err_msg="fact: TRANSPOSE_CONV scatters each input through its unflipped filter")
    assert ec.spec("tflite:conv_transpose", channels=4, spatial=(3, 4), kernel_size=(3, 2), units=5).kernel_shape == (5, 3, 2, 4)


# -- the backend on the same facts -------------------------------------------------------------
LAYERS = [
    ec.spec("tflite:dense", channels=3, spatial=(2, 4), units=5),
    ec.spec("torch:dense", channels=3, spatial=(2, 4), units=5, bias=False),  # a CHW flatten: transposed first
    ec.spec("tflite:conv", channels=4, spatial=(7, 6), kernel_size=(3, 2), units=6, stride=2, padding=1, groups=2),
    ec.spec("tflite:conv", channels=3, spatial=(7, 6), kernel_size=(3, 3), units=4, stride=2, padding="same"),
    ec.spec("tflite:conv", channels=3, spatial=(9,), kernel_size=(3,), units=2, dilation=2, padding="same"),
    ec.spec("tflite:conv", channels=2, spatial=(5, 4, 4), kernel_size=(2, 2, 2), units=3, stride=2),
    ec.spec("tflite:depthwise", channels=3, spatial=(5, 5), kernel_size=(3, 2), multiplier=2, stride=(1, 2)),
    ec.spec("tflite:conv_transpose", channels=4, spatial=(4, 3), kernel_size=(3, 2), units=5, stride=2, padding=1,
            output_padding=1),
    ec.spec("torch:conv", channels=3, spatial=(6, 6), kernel_size=(3, 3), units=4),  # NCHW, OIHW: around the op
    ec.spec("theano:conv", channels=3, spatial=(5, 5), kernel_size=(3, 2), units=2),  # true convolution: flipped
]


@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: f"{s.name}-{s.describe()[:40]}")
def test_backend_layers_match_the_reference(spec):
    from ._support import random_weights, reference

    layer = backends.get("tflite").build(spec)
    kernel, bias, x = random_weights(spec)
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)
    k2, b2 = layer.get_weights()
    np.testing.assert_array_equal(k2, kernel)
    if bias is not None:
        np.testing.assert_array_equal(b2, bias)
    assert layer._template(len(x)).places is not None, "the converter's weights were found: new ones are patched in"
    kernel, bias, x = random_weights(spec, seed=1)  # patched into the flatbuffer, not converted again
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)


def test_unsupported_says_why():
    backend = backends.get("tflite")
    conv = ec.spec("tflite:conv", channels=2, spatial=(5, 5), kernel_size=(3, 3), units=2)
    assert backend.unsupported(conv, "float32") is None
    assert "float32 only" in backend.unsupported(conv, "float64")
    assert "float32 only" in backend.unsupported(conv, "float16")
    dilated = ec.spec("tflite:conv_transpose", channels=2, spatial=(4, 4), kernel_size=(2, 2), units=2, dilation=2)
    assert "dilation" in backend.unsupported(dilated, "float32")
    with pytest.raises(ec.SpecError, match="dilation"):
        backend.build(dilated)


def test_verify_tflite_dense_to_onnx_conv():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'equivcheck[onnx]'")
    from equivcheck.verification import verify_pair

    src = ec.spec("tflite:dense", channels=3, spatial=(3, 3), units=4)
    dst = ec.spec("onnx:conv", channels=3, spatial=(3, 3), units=4)
    case = verify_pair(src, dst, source_backend="tflite", target_backend="onnxruntime", batch=4)
    assert case.verdict == "pass", case.reason
    assert any(m.name == "wrong flatten order" and m.outcome == "rejected" for m in case.mutations)

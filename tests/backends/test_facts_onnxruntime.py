"""ONNX conventions, pinned on real ONNX Runtime against float64 loops written here (not equivcheck's planner).

Each model is built with ``onnx.helper`` in the test itself; the backend's own layers are then checked
against the same facts, and the onnx preset against the ONNX operator shapes.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck.verification import verify_pair

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'equivcheck[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'equivcheck[onnx]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run(op: str, x: np.ndarray, inits: list[np.ndarray], out_shape: tuple[int, ...], **attrs) -> np.ndarray:
    """One ``op`` node on ``x`` with initializers W (and B), on the CPU provider.

    ``out_shape`` is the expected output's: ONNX shape inference must agree (``full_check``).
    """
    names = ["W", "B"][: len(inits)]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *names], ["y"], **attrs)], "fact",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(inits, names)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def _conv(x, w, b, stride, dilation, pads, group):
    """Cross-correlation, float64 loops: x (N, C, *S), w (M, C/group, *k), pads (lo, hi) per axis."""
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *pads])
    n = x.shape[0]
    m, cg, *k = w.shape
    out = [(s - d * (kk - 1) - 1) // st + 1 for s, kk, st, d in zip(x.shape[2:], k, stride, dilation)]
    y = np.zeros((n, m, *out))
    for o in range(m):
        g = o // (m // group)
        for pos in itertools.product(*map(range, out)):
            for kpos in itertools.product(*map(range, k)):
                at = tuple(p * st + q * d for p, q, st, d in zip(pos, kpos, stride, dilation))
                y[(slice(None), o, *pos)] += x[(slice(None), slice(g * cg, (g + 1) * cg), *at)] @ w[(o, slice(None), *kpos)]
    return y + (0 if b is None else b.reshape(1, -1, *[1] * len(out)))


def _conv_transpose(x, w, b, stride, dilation, pads, output_padding, group):
    """Transposed conv, float64 scatter: w (C, M/group, *k); output cropped by pads, output_padding at the end."""
    n, c, *s = x.shape
    _, mg, *k = w.shape
    full = [(si - 1) * st + d * (kk - 1) + 1 + op for si, st, d, kk, op in zip(s, stride, dilation, k, output_padding)]
    y = np.zeros((n, mg * group, *full))
    for i in range(c):
        g = i // (c // group)
        for pos in itertools.product(*map(range, s)):
            for kpos in itertools.product(*map(range, k)):
                at = tuple(p * st + q * d for p, q, st, d in zip(pos, kpos, stride, dilation))
                y[(slice(None), slice(g * mg, (g + 1) * mg), *at)] += np.outer(x[(slice(None), i, *pos)], w[(i, slice(None), *kpos)])
    crop = tuple(slice(lo, f - hi) for (lo, hi), f in zip(pads, full))
    y = y[(slice(None), slice(None), *crop)]
    return y + (0 if b is None else b.reshape(1, -1, *[1] * len(s)))


def _flat_pads(pads):
    return [lo for lo, _ in pads] + [hi for _, hi in pads]


RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b(trans_b):
    x, w, b = _randn(3, 6), _randn(6, 4), _randn(4)
    stored = w.T if trans_b else w  # transB=1: B is (out, in), as torch.onnx exports nn.Linear
    expected = x.astype(np.float64) @ w + b
    y = _run("Gemm", x, [stored, b], expected.shape, transB=trans_b)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: Gemm with transB={trans_b} reads B as {'(out, in)' if trans_b else '(in, out)'}")
    with pytest.raises(Exception, match=r"(?i)gemm|shape|dimension"):
        _run("Gemm", x, [stored.T.copy(), b], expected.shape, transB=trans_b)  # the other layout does not even fit


@pytest.mark.parametrize(("rank", "group"), [(1, 1), (2, 2), (3, 1), (2, 4)])
def test_conv_weight_is_m_c_over_group_k_and_correlates(rank, group):
    spatial, k = (7, 6, 5)[:rank], (3, 2, 2)[:rank]
    stride, dilation = (2, 1, 2)[:rank], (1, 2, 1)[:rank]
    pads = ((1, 0), (0, 2), (1, 1))[:rank]
    x, w, b = _randn(2, 4, *spatial), _randn(8, 4 // group, *k), _randn(8)
    expected = _conv(x, w, b, stride, dilation, pads, group)
    y = _run("Conv", x, [w, b], expected.shape, strides=list(stride), dilations=list(dilation), pads=_flat_pads(pads),
             group=group)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5,
                               err_msg=f"fact: Conv weight is (M, C/group, *k), cross-correlation (rank {rank}, group {group})")
    spec = ec.spec("onnx:depthwise" if group == 4 else "onnx:conv", channels=4, spatial=spatial, kernel_size=k,
                   units=8, stride=stride, dilation=dilation, groups=group if group < 4 else 1, padding=0)
    assert spec.kernel_shape == w.shape, "onnx preset: Conv kernel (M, C/group, *k)"


@pytest.mark.parametrize(("rank", "group"), [(1, 1), (2, 2), (3, 1)])
def test_conv_transpose_weight_is_c_m_over_group_k(rank, group):
    spatial, k = (4, 3, 3)[:rank], (3, 2, 2)[:rank]
    stride, dilation, out_pad = (2, 3, 2)[:rank], (1, 2, 1)[:rank], (1, 0, 1)[:rank]
    pads = ((1, 1), (0, 0), (1, 1))[:rank]
    x, w, b = _randn(2, 4, *spatial), _randn(4, 6 // group, *k), _randn(6)
    expected = _conv_transpose(x, w, b, stride, dilation, pads, out_pad, group)
    y = _run("ConvTranspose", x, [w, b], expected.shape, strides=list(stride), dilations=list(dilation),
             pads=_flat_pads(pads), output_padding=list(out_pad), group=group)
    np.testing.assert_allclose(
        y, expected, rtol=1e-5, atol=1e-5,
        err_msg="fact: ConvTranspose weight is (C, M/group, *k), scattered unflipped, output_padding added at the end")
    spec = ec.spec("onnx:conv_transpose", channels=4, spatial=spatial, kernel_size=k, units=6, stride=stride,
                   dilation=dilation, padding=tuple(lo for lo, _ in pads), output_padding=out_pad, groups=group)
    assert spec.kernel_shape == w.shape and spec.output_shape == y.shape[1:], "onnx preset: ConvTranspose (C, M/group, *k)"


@pytest.mark.parametrize("size", [6, 7])
def test_same_upper_and_lower_at_stride_2(size):
    """SAME_UPPER puts the odd pad after (TensorFlow's "same"), SAME_LOWER before."""
    x, w = _randn(1, 2, size, size), _randn(3, 2, 3, 3)
    total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
    upper, lower = (total // 2, total - total // 2), (total - total // 2, total // 2)
    outputs = {}
    for mode, pads in (("SAME_UPPER", upper), ("SAME_LOWER", lower)):
        expected = _conv(x, w, None, (2, 2), (1, 1), (pads, pads), 1)
        outputs[mode] = _run("Conv", x, [w], expected.shape, strides=[2, 2], auto_pad=mode)
        np.testing.assert_allclose(outputs[mode], expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"fact: auto_pad={mode} at stride 2 on {size} pads {pads}")
    same = ec.spec("onnx:conv", channels=2, spatial=(size, size), kernel_size=(3, 3), units=3, stride=2, padding="same")
    assert same.pads() == (upper, upper), "TensorFlow's 'same' (the spec's) is SAME_UPPER"
    if total % 2:
        assert not np.allclose(outputs["SAME_UPPER"], outputs["SAME_LOWER"]), "an odd pad tells them apart"


# -- the backend on the same facts -------------------------------------------------------------
LAYERS = [
    ec.spec("onnx:dense", channels=3, spatial=(2, 4), units=5),
    ec.spec("onnx:dense", channels=3, spatial=(2, 4), units=5, kernel_layout="IO"),  # Gemm transB=0
    ec.spec("keras:dense", channels=3, spatial=(2, 4), units=5),  # channels-last map: a Transpose node first
    ec.spec("onnx:conv", channels=4, spatial=(7, 6), kernel_size=(3, 2), units=6, stride=2, padding=1, groups=2, dilation=(1, 2)),
    ec.spec("onnx:conv", channels=4, spatial=(7, 5, 4), kernel_size=(3, 2, 2), units=6, stride=2, padding="same"),
    ec.spec("onnx:conv", channels=3, spatial=(9,), kernel_size=(3,), units=2, stride=2, dilation=2, padding="same"),
    ec.spec("onnx:depthwise", channels=3, spatial=(5, 5), kernel_size=(3, 2), multiplier=2),
    ec.spec("onnx:conv_transpose", channels=4, spatial=(4, 3), kernel_size=(3, 2), units=6, stride=2, padding=1,
            output_padding=1, groups=2),
    ec.spec("keras:conv", channels=3, spatial=(6, 6), kernel_size=(3, 3), units=4, stride=2, padding="same"),
    ec.spec("theano:conv", channels=3, spatial=(5, 5), kernel_size=(3, 2), units=2),  # true convolution: flipped
]


@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: f"{s.name}-{s.describe()[:40]}")
def test_backend_layers_match_the_reference(spec):
    from ._support import random_weights, reference

    layer = backends.get("onnxruntime").build(spec)
    kernel, bias, x = random_weights(spec)
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)
    k2, b2 = layer.get_weights()
    np.testing.assert_array_equal(k2, kernel)
    np.testing.assert_array_equal(b2, bias)
    kernel, bias, x = random_weights(spec, seed=1)  # new weights: a new session, not the old one's results
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)


def test_backend_model_is_a_checked_single_node():
    from equivcheck.backends.onnxruntime import build_model

    spec = ec.spec("onnx:conv", channels=2, spatial=(5, 5), kernel_size=(3, 3), units=3)
    model = build_model(spec, "float32", np.zeros((3, 2, 3, 3), np.float32), np.zeros(3, np.float32))
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert [i.name for i in model.graph.initializer] == ["W", "B"]
    assert [i.name for i in model.graph.input] == ["x"], "weights are initializers, not inputs"
    onnx.checker.check_model(model, full_check=True)


def test_dtypes_without_kernels_say_so():
    backend = backends.get("onnxruntime")
    conv = ec.spec("onnx:conv", channels=2, spatial=(5, 5), kernel_size=(3, 3), units=3)
    assert backend.unsupported(conv, "float32") is None
    assert "float64" in (backend.unsupported(conv, "float64") or ""), "fact: the CPU provider has no float64 Conv"
    assert backend.unsupported(conv, "bfloat16"), "fact: ONNX Conv takes no bfloat16"
    dense = ec.spec("onnx:dense", channels=3, units=2)
    assert backend.unsupported(dense, "float64") is None, "fact: the CPU provider has a float64 Gemm"


# -- the backend as the real source of verify ----------------------------------------------------
def test_verify_onnx_dense_to_torch_conv():
    pytest.importorskip("torch", reason="torch is not installed: pip install 'equivcheck[torch]'")
    src = ec.spec("onnx:dense", channels=4, spatial=(3, 3), units=5, kernel_layout="IO")  # Gemm transB=0
    dst = ec.spec("torch:conv", channels=4, spatial=(3, 3), units=5)
    case = verify_pair(src, dst, source_backend="onnxruntime", target_backend="torch")
    assert case.verdict == "pass", case.reason
    assert any(m.name == "dense kernel not transposed" and m.outcome == "rejected" for m in case.mutations)

    def forgot_transpose(kernel, bias):
        return kernel.reshape(dst.kernel_shape), bias  # (in, out) read as (out, in)

    case = verify_pair(src, dst, source_backend="onnxruntime", target_backend="torch", converter=forgot_transpose,
                       mutants=False)
    assert case.verdict == "fail", case.reason
    assert case.diagnosis and case.diagnosis["mutant"] == "dense kernel not transposed", case.diagnosis


@pytest.mark.parametrize(("source", "target", "framework"), [
    ("onnx:dense", "keras:dense", "keras"),
    ("onnx:dense", "torch:conv", "torch"),
    ("onnx:conv", "keras:conv", "keras"),
    ("onnx:conv_transpose", "torch:conv_transpose", "torch"),
])
def test_an_onnx_layer_is_the_real_source_of_an_onnx2torch_style_check(source, target, framework):
    """The onnx2torch case end to end: ONNX Runtime runs the source, the target framework its layer."""
    pytest.importorskip(framework, reason=f"{framework} is not installed")
    from equivcheck.checker import Checker

    shape = dict(channels=3, spatial=(5, 6), units=4, **({} if source.endswith("dense") else dict(kernel_size=(3, 3))))
    src, dst = ec.spec(source, **shape), ec.spec(target, **shape)
    checker = Checker()
    cases = checker.check_converter(lambda k, b: ec.convert(src, dst, k, b), source, target, **shape)
    backend = {"keras": "keras", "torch": "torch"}[framework]
    assert [(c.source_backend, c.target_backend, c.verdict) for c in cases] == [("onnxruntime", backend, "pass")]
    if source == "onnx:dense":  # Gemm transB=1 read as if transB=0: the classic wrong transpose
        as_io = src.replace(kernel_layout="IO")
        wrong = ec.plan(as_io, dst)
        side = " (source)" if target.endswith("dense") else ""
        with pytest.raises(ec.ConversionCheckFailed, match=rf"except: dense kernel not transposed{re.escape(side)}"):
            checker.check_converter(lambda k, b: (wrong.apply(k.reshape(as_io.kernel_shape)), b), source, target, **shape)


def test_matmul_then_add_is_x_at_an_in_out_weight_and_the_tf2onnx_dense_is_built_that_way():
    """tf2onnx exports a Keras Dense as MatMul(x, W) + B, W stored (in, out), after an NHWC (HWC) flatten."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 6)), rng.standard_normal((6, 4))
    y = _run("MatMul", x, [w], (2, 4))
    np.testing.assert_allclose(y, x.astype(np.float32) @ w.astype(np.float32), rtol=1e-5, atol=1e-6)
    from equivcheck.backends.onnxruntime import build_model

    src = ec.spec("tf2onnx:dense", channels=3, spatial=(2, 2), units=4)
    assert (src.kernel_layout, src.flatten, src.data_format) == ("IO", "HWC", "channels_last")
    assert [n.op_type for n in build_model(src, "float32").graph.node] == ["Flatten", "MatMul", "Add"]
    kernel, bias = rng.standard_normal((12, 4)), rng.standard_normal(4)
    maps = rng.standard_normal((2, 2, 2, 3))  # N, H, W, C
    layer = backends.get("onnxruntime").build(src, "float32")
    layer.set_weights(kernel.astype(np.float32), bias.astype(np.float32))
    np.testing.assert_allclose(layer(maps.astype(np.float32)), maps.reshape(2, 12) @ kernel + bias, rtol=1e-5, atol=1e-5)

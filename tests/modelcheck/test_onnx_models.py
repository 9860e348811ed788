"""check_models with ONNX models (run by ONNX Runtime) against torch models exported from them, in both directions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from equivcheck.errors import EquivcheckError

SHAPE = (2, 3, 12, 10)


@pytest.fixture(scope="module")
def onnx():
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    return pytest.importorskip("onnx", reason="onnx not installed: pip install 'equivcheck[onnx]'")


@pytest.fixture(scope="module")
def ec(onnx, torch):
    import equivcheck as ec

    return ec


def _export(model, shape: tuple[int, ...], path) -> str:
    import torch

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return str(path)


@pytest.fixture(scope="module")
def vgg(torch):
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 6 * 5, 10), nn.ReLU(), nn.Linear(10, 10)).eval()


@pytest.fixture(scope="module")
def vgg_path(vgg, tmp_path_factory):
    return _export(vgg, SHAPE, tmp_path_factory.mktemp("onnx") / "vgg.onnx")


def _edited(onnx, path: str, edit) -> object:
    model = onnx.load(path)
    edit(model)
    return model


def test_torch_to_onnx_passes_with_every_layer_paired(ec, vgg, vgg_path):
    result = ec.check_models(vgg, vgg_path, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted, r.kind) for r in result.layers] == [
        ("0", "/0/Conv", "conv"), ("4", "/4/Gemm", "dense"), ("6", "/6/Gemm", "dense")]
    assert not result.unpaired and result.end_to_end["float32"]["passed"]
    assert result.layers[1].boundary.startswith("flattened CHW")  # the map read off the graph's Flatten
    assert result.converted == "onnxruntime vgg"


def test_onnx_to_torch_passes(ec, vgg, vgg_path):
    result = ec.check_models(vgg_path, vgg)  # the ONNX graph declares its input: no input_shape needed
    assert result.verdict == "pass", result.render()
    assert result.input_shape == SHAPE
    assert [r.converted for r in result.layers] == ["0", "4", "6"] and not result.unpaired
    assert result.layers[1].boundary == "flattened CHW"


def test_model_proto_and_session_are_accepted(ec, onnx, vgg, vgg_path):
    import onnxruntime as ort

    assert ec.check_models(vgg, onnx.load(vgg_path), input_shape=SHAPE).verdict == "pass"
    session = ort.InferenceSession(vgg_path, providers=["CPUExecutionProvider"])
    assert ec.check_models(session, vgg).verdict == "pass"
    with open(vgg_path, "rb") as f:
        in_memory = ort.InferenceSession(f.read(), providers=["CPUExecutionProvider"])
    assert ec.check_models(vgg, in_memory, input_shape=SHAPE).verdict == "pass"


def test_wrong_flatten_order_in_the_first_gemm_is_named_there(ec, onnx, vgg, vgg_path):
    from onnx import numpy_helper

    def permute(model):  # a converter that read the map as HWC-flattened
        t = next(t for t in model.graph.initializer if t.name == "4.weight")
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(w.reshape(10, 4, 6, 5).transpose(0, 2, 3, 1).reshape(10, -1), t.name))

    result = ec.check_models(vgg, _edited(onnx, vgg_path, permute), input_shape=SHAPE)
    assert result.verdict == "fail"
    first = result.first_divergence
    assert (first.source, first.converted) == ("4", "/4/Gemm")
    assert first.diagnosis.startswith("wrong flatten order (HWC read as CHW)")
    assert [r.verdict for r in result.layers] == ["pass", "fail", "pass"]  # replayed alone: nothing accumulates


def test_transb_flipped_without_transposing_is_named(ec, onnx, vgg, vgg_path):
    def flip(model):
        gemm = [n for n in model.graph.node if n.op_type == "Gemm"][1]  # the square 10x10 one, so it still runs
        next(a for a in gemm.attribute if a.name == "transB").i = 0

    result = ec.check_models(vgg, _edited(onnx, vgg_path, flip), input_shape=SHAPE)
    first = result.first_divergence
    assert result.verdict == "fail" and first.converted == "/6/Gemm"
    assert "without transpose" in first.diagnosis and first.mapping == "w.T"
    assert [r.verdict for r in result.layers] == ["pass", "pass", "fail"]


def test_fixed_batch_export_runs_at_the_check_batch(ec, torch, vgg, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(vgg, (torch.randn(1, *SHAPE[1:]),), str(tmp_path / "b1.onnx"), dynamo=False)  # batch 1, fixed
    result = ec.check_models(vgg, str(tmp_path / "b1.onnx"), input_shape=SHAPE)
    assert result.verdict == "pass", result.render()


def test_gemm_alpha_beta_folded_into_kernel_and_bias(ec, onnx, torch):
    from onnx import helper, numpy_helper
    from torch import nn

    torch.manual_seed(2)
    linear = nn.Linear(6, 4).eval()
    w, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, ["N", 6])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              initializer=[numpy_helper.from_array(w * 2, "w"), numpy_helper.from_array(b / 2, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = ec.check_models(linear, model, input_shape=(2, 6))
    assert result.verdict == "pass", result.render()
    halved = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    next(a for a in halved.graph.node[0].attribute if a.name == "alpha").f = 0.25
    assert ec.check_models(linear, halved, input_shape=(2, 6)).first_divergence.converted == "gemm"


def _convs_2d(nn):
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2)), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 4, 1, groups=2),
                         nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1))


def _convs_1d(nn):
    return nn.Sequential(nn.Conv1d(3, 4, 5, stride=2, padding=2), nn.Tanh(), nn.ConvTranspose1d(4, 6, 4, stride=3, groups=2))


def _conv_3d(nn):
    return nn.Sequential(nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)), nn.Flatten(), nn.Linear(4 * 3 * 3 * 5, 3))


def _dense_per_position(nn):  # exported as MatMul followed by Add
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


@pytest.mark.parametrize(("build", "shape", "kinds"), [
    (_convs_2d, (2, 3, 9, 11), ["conv", "depthwise", "conv", "conv_transpose"]),
    (_convs_1d, (2, 3, 13), ["conv", "conv_transpose"]),
    (_conv_3d, (2, 3, 4, 6, 5), ["conv", "dense"]),
    (_dense_per_position, (2, 5, 8), ["dense", "dense"]),
])
def test_conv_geometries_and_matmul_pass_both_ways(ec, torch, onnx, tmp_path, build, shape, kinds):
    from torch import nn

    torch.manual_seed(1)
    model = build(nn).eval()
    path = _export(model, shape, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    there = ec.check_models(model, path, input_shape=shape)
    back = ec.check_models(path, model)
    for result in (there, back):
        assert result.verdict == "pass", result.render()
        assert [r.kind for r in result.layers] == kinds and not result.unpaired
    if build is _dense_per_position:
        assert "MatMul" in ops and "Add" in ops and "Gemm" not in ops


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_read_as_the_pads_onnx_runtime_applies(ec, onnx, auto_pad):
    """The padding the adapter reports, given as explicit pads, gives ONNX Runtime's own output."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from equivcheck.modelcheck.onnx_adapter import OnnxAdapter

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 4, 3)).astype(np.float32), "w")

    def model(**attrs):
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 3], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 3, 7, 8])],
                                  [helper.make_tensor_value_info("y", 1, None)], initializer=[w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = rng.standard_normal((1, 3, 7, 8)).astype(np.float32)
    adapter = OnnxAdapter(model(auto_pad=auto_pad), "converted")
    y, (rec,) = adapter.run(x)
    pads = rec.config["padding"]
    pairs = [p if isinstance(p, tuple) else (p, p) for p in pads]
    assert pairs[0][0] != pairs[0][1]  # an odd total: the two modes differ here
    explicit = model(pads=[lo for lo, _ in pairs] + [hi for _, hi in pairs]).SerializeToString()
    session = ort.InferenceSession(explicit, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], y)
    np.testing.assert_array_equal(rec.y, y)


def test_bad_input_is_one_line(ec, onnx, vgg, vgg_path, tmp_path):
    from onnx import helper, numpy_helper

    def one_line(call) -> str:
        with pytest.raises(EquivcheckError) as err:
            call()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "is not a torch.nn.Module" in one_line(lambda: ec.check_models(vgg, object(), input_shape=SHAPE))
    missing = str(tmp_path / "missing.onnx")
    assert "not found" in one_line(lambda: ec.check_models(vgg, missing, input_shape=SHAPE))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0a\xff not a protobuf" * 7)
    assert "junk.onnx" in one_line(lambda: ec.check_models(vgg, str(junk), input_shape=SHAPE))

    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                             [helper.make_tensor_value_info("x", 1, [2, 3, 12, 10])],
                             [helper.make_tensor_value_info("y", 1, None)])
    relu_model = helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)])
    assert "ran no linear layer" in one_line(lambda: ec.check_models(relu_model, vgg))

    w = numpy_helper.from_array(np.ones((3, 3, 3, 4), np.float32), "w_hwio")
    nodes = [helper.make_node("Transpose", ["w_hwio"], ["w"], name="to_oihw", perm=[3, 2, 0, 1]),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    computed = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3, 12, 10])],
                                                   [helper.make_tensor_value_info("y", 1, None)], initializer=[w]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    message = one_line(lambda: ec.check_models(vgg, computed, input_shape=SHAPE))
    assert "'conv'" in message and "'to_oihw' (Transpose)" in message and "initializer" in message

    import onnxruntime as ort

    session = ort.InferenceSession(vgg_path, providers=["CPUExecutionProvider"])
    session._model_path = session._model_bytes = None  # a session that kept neither its file nor its bytes
    assert "keeps no model" in one_line(lambda: ec.check_models(session, vgg))

"""explore on exported models: one linear node of an ONNX graph (run by ONNX Runtime), one op of a TFLite model.

Each model is built here with the real tools (``onnx.helper``, ``tf.lite.TFLiteConverter``), explored
against a preset, and the mapping found must be what ``ec.plan`` says between the matching presets.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.errors import EquivcheckError, SpecError
from equivcheck.exploration import explore
from equivcheck.exploration.objects import make_side
from equivcheck.specs import Shape

rng = np.random.default_rng(0)


@pytest.fixture(scope="module")
def onnx():
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    return pytest.importorskip("onnx", reason="onnx not installed: pip install 'equivcheck[onnx]'")


def _value(name, dims):
    from onnx import helper

    return helper.make_tensor_value_info(name, 1, dims)


def _model(nodes, x_dims, consts, y_dims=None):
    """A float32 model reading ``x``, writing the last node's output; ``consts`` become initializers."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "test", [_value("x", x_dims)], [_value(nodes[-1].output[0], y_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _random(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _node(op, inputs, name="layer", output="y", **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=name, **attrs)


def _plan(source, target, **shape):
    return ec.plan(ec.spec(source, **shape), ec.spec(target, **shape))


# -- ONNX: one node ---------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b, same_as", [(1, "onnx:dense"), (0, "keras:dense")])
def test_gemm_against_torch_dense(onnx, trans_b, same_as):
    w = _random(4, 6) if trans_b else _random(6, 4)
    model = _model([_node("Gemm", ["x", "W", "B"], transB=trans_b)], ["N", 6], {"W": w, "B": _random(4)})
    r = explore(model, "torch:dense")
    assert r.found, r.reason
    assert r.mapping.equivalent(_plan(same_as, "torch:dense", channels=6, units=4))
    assert r.code["numpy"] == ("w" if trans_b else "w.T")  # transB=1 is torch's (out, in): nothing to do
    assert r.source.probed.side.has_bias and r.source.probed.side.framework == "onnxruntime"


def test_matmul_add_is_a_dense_layer_with_bias(onnx):
    nodes = [_node("MatMul", ["x", "W"], name="mm", output="t"), _node("Add", ["t", "B"], name="add")]
    model = _model(nodes, ["N", 5], {"W": _random(5, 3), "B": _random(3)})
    r = explore(model, "keras:dense")
    assert r.found and r.mapping.equivalent(_plan("keras:dense", "keras:dense", channels=5, units=3))
    assert r.source.probed.side.has_bias and r.bias.startswith("copied")


def test_conv_stride_2_same_upper_against_keras(onnx):
    # a 6×5 map, 3×3 kernel, stride 2: SAME_UPPER pads (0, 1) and (1, 1), as TensorFlow's "same" does
    conv = _node("Conv", ["x", "W", "B"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    model = _model([conv], ["N", 3, 6, 5], {"W": _random(4, 3, 3, 3), "B": _random(4)})
    shape = dict(kernel_size=(3, 3), stride=2, padding="same")
    r = explore(model, "keras:conv", **shape)
    assert r.found, r.reason
    assert r.mapping.equivalent(_plan("onnx:conv", "keras:conv", channels=3, spatial=(6, 5), units=4, **shape))
    assert r.source.probed.side.geometry.pads() == ((0, 1), (1, 1))


def test_conv_same_lower_geometry(onnx):
    conv = _node("Conv", ["x", "W"], strides=[2, 2], auto_pad="SAME_LOWER")
    model = _model([conv], ["N", 3, 6, 5], {"W": _random(4, 3, 3, 3)})
    side = make_side(model, Shape())
    assert side.geometry.pads() == ((1, 0), (1, 1)) and not side.has_bias


@pytest.mark.parametrize("groups, target, extra", [(2, "torch:conv", dict(groups=2)),
                                                   (4, "keras:depthwise", dict(multiplier=2))])
def test_grouped_and_depthwise_conv(onnx, groups, target, extra):
    conv = _node("Conv", ["x", "W", "B"], group=groups, pads=[1, 0, 1, 0], dilations=[1, 2])
    model = _model([conv], ["N", 4, 5, 6], {"W": _random(8, 4 // groups, 3, 2), "B": _random(8)})
    shape = dict(kernel_size=(3, 2), padding=(1, 0), dilation=(1, 2), **extra)
    r = explore(model, target, **shape)
    assert r.found, r.reason
    source = "onnx:conv" if groups == 2 else "onnx:depthwise"
    assert r.mapping.equivalent(_plan(source, target, channels=4, spatial=(5, 6), units=8, **shape))


@pytest.mark.parametrize("ks, spatial", [((3,), (7,)), ((3, 2, 2), (5, 4, 3))])
def test_conv_1d_and_3d_are_torch_layout(onnx, ks, spatial):
    conv = _node("Conv", ["x", "W", "B"], strides=[2] * len(ks))
    model = _model([conv], ["N", 2, *spatial], {"W": _random(3, 2, *ks), "B": _random(3)})
    r = explore(model, "torch:conv", kernel_size=ks, stride=2)
    assert r.found and r.code["numpy"] == "w"


def test_conv_transpose_against_torch(onnx):
    ct = _node("ConvTranspose", ["x", "W", "B"], strides=[2, 2], pads=[1, 0, 1, 0], output_padding=[1, 0])
    model = _model([ct], ["N", 2, 3, 4], {"W": _random(2, 3, 3, 2), "B": _random(3)})
    shape = dict(kernel_size=(3, 2), stride=2, padding=(1, 0), output_padding=(1, 0))
    r = explore(model, "torch:conv_transpose", **shape)
    assert r.found, r.reason
    assert r.mapping.equivalent(_plan("onnx:conv_transpose", "torch:conv_transpose", channels=2, spatial=(3, 4),
                                      units=3, **shape))
    assert r.source.probed.side.geometry.output_spatial == (6, 8)


# -- ONNX: a node picked from a graph -----------------------------------------------------------
def _three_nodes():
    """x (N, 2, 4, 4) → Conv 'conv1' → Relu → Flatten → Gemm 'fc' (3·3·3 → 5)."""
    nodes = [_node("Conv", ["x", "Wc", "Bc"], name="conv1", output="c", kernel_shape=[2, 2]),
             _node("Relu", ["c"], name="relu", output="r"), _node("Flatten", ["r"], name="flat", output="f"),
             _node("Gemm", ["f", "Wf", "Bf"], name="fc", output="y", transB=1)]
    return _model(nodes, [1, 2, 4, 4], {"Wc": _random(3, 2, 2, 2), "Bc": _random(3), "Wf": _random(5, 27),
                                        "Bf": _random(5)})


def test_node_picked_by_name_reads_its_map_from_the_graph(onnx, tmp_path):
    model = _three_nodes()
    # fc reads conv1's 3×3×3 output flattened in CHW order: torch's conv over that map, no keywords needed
    r = explore((model, "fc"), "torch:conv")
    assert r.found and r.mapping.equivalent(_plan("onnx:dense", "torch:conv", channels=3, spatial=(3, 3), units=5))
    path = tmp_path / "three.onnx"
    onnx.save(model, str(path))
    r = explore(f"{path}:conv1", "keras:conv", kernel_size=(2, 2))
    assert r.found and r.mapping.equivalent(_plan("onnx:conv", "keras:conv", channels=2, spatial=(4, 4), units=3,
                                                  kernel_size=(2, 2)))
    assert explore((str(path), "c"), "torch:conv", kernel_size=(2, 2)).code["numpy"] == "w"  # by output name


def test_inference_session_is_a_side(onnx, tmp_path):
    import onnxruntime as ort

    w = _random(4, 6)
    model = _model([_node("Gemm", ["x", "W", "B"], transB=1)], ["N", 6], {"W": w, "B": _random(4)})
    path = tmp_path / "fc.onnx"
    onnx.save(model, str(path))
    for session in (ort.InferenceSession(str(path)), ort.InferenceSession(model.SerializeToString())):
        r = explore(session, "keras:dense")
        assert r.found and r.mapping.equivalent(_plan("onnx:dense", "keras:dense", channels=6, units=4))
    assert explore(model, "onnx:dense").code["numpy"] == "w"
    assert np.array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), w)  # the model is never changed


def test_dynamic_map_takes_spatial(onnx):
    model = _model([_node("Conv", ["x", "W"])], ["N", 2, "H", "W"], {"W": _random(3, 2, 2, 2)})
    with pytest.raises(SpecError, match="pass spatial="):
        explore(model, "torch:conv")
    assert explore(model, "torch:conv", spatial=(5, 4), kernel_size=(2, 2)).found
    with pytest.raises(SpecError, match=r"spatial=\(5, 5\) but the model declares"):
        explore(_model([_node("Conv", ["x", "W"])], ["N", 2, 4, 4], {"W": _random(3, 2, 2, 2)}), "torch:conv",
                spatial=(5, 5))


@pytest.mark.parametrize("make, match", [
    (lambda: _three_nodes(), "2 linear nodes: pick one .* conv1, fc"),
    (lambda: (_three_nodes(), "nope"), "node='nope' not found .* conv1, relu, flat, fc"),
    (lambda: (_three_nodes(), "relu"), r"node='relu' is Relu: expected .* \(here: conv1, fc\)"),
    (lambda: _model([_node("Relu", ["x"])], ["N", 4], {}), "no linear node .* its ops: Relu"),
    (lambda: _model([_node("Gemm", ["x", "W"], transA=1)], [6, "N"], {"W": _random(6, 4)}), "transA=1"),
    (lambda: _model([_node("Gemm", ["x", "W"])], ["N", 5], {"W": _random(6, 4)}), "reads 5 features"),
    (lambda: _model([_node("ConvTranspose", ["x", "W"], pads=[0, 1])], ["N", 2, 4], {"W": _random(2, 3, 2)}),
     "uneven"),
])
def test_bad_onnx_input_is_one_line(onnx, make, match):
    with pytest.raises(SpecError, match=match) as info:
        explore(make(), "torch:dense")
    assert "\n" not in str(info.value)


def test_bad_files_are_one_line(onnx, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07\xff\xff garbage")
    for source, match in [(str(junk), "junk.onnx.* is not an ONNX model"), (str(tmp_path / "none.onnx"), "not found"),
                          (b"not a flatbuffer at all", "not a TFLite flatbuffer")]:
        with pytest.raises(EquivcheckError, match=match) as info:
            explore(source, "torch:dense")
        assert "\n" not in str(info.value)


# -- the CLI ------------------------------------------------------------------------------------
def _cli(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "equivcheck", "explore", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_model_path_with_node(onnx, tmp_path):
    onnx.save(_three_nodes(), str(tmp_path / "model.onnx"))
    done = _cli("--source", "model.onnx:fc", "--to", "torch:conv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    code = _plan("onnx:dense", "torch:conv", channels=3, spatial=(3, 3), units=5).code("numpy")
    assert code in done.stdout and "onnx Gemm 'fc'" in done.stdout
    for args, match in [(("--source", "model.onnx"), "2 linear nodes"), (("--source", "model.onnx:zz"), "'zz' not found"),
                        (("--source", "missing.onnx:fc"), "not found"), (("--source", "model.onnx:relu"), "is Relu")]:
        bad = _cli(*args, "--to", "torch:conv", cwd=tmp_path)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and match in lines[0], bad.stderr
        assert "Traceback" not in bad.stderr


# -- TFLite ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert(keras):
    import tensorflow as tf

    def run(*layers):
        model = keras.Sequential([*layers])
        for layer in model.layers:  # non-zero biases: the converter folds a zero one away
            layer.set_weights([_random(*w.shape) for w in layer.get_weights()])
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()

    return run


def test_tflite_dense(keras, convert, tmp_path):
    L = keras.layers
    model = convert(keras.Input((6,)), L.Dense(4))
    r = explore(model, "keras:dense")
    assert r.found and r.mapping.equivalent(_plan("tflite:dense", "keras:dense", channels=6, units=4))
    assert r.source.probed.side.framework == "tflite" and r.code["numpy"] == "w.T"
    # Flatten → Dense on a 3×4×2 map (NHWC): the map comes from the model, the preset borrows it
    (tmp_path / "fc.tflite").write_bytes(convert(keras.Input((3, 4, 2)), L.Flatten(), L.Dense(5)))
    r = explore(str(tmp_path / "fc.tflite"), "torch:conv")
    assert r.found and r.mapping.equivalent(_plan("tflite:dense", "torch:conv", channels=2, spatial=(3, 4), units=5))
    done = _cli("--source", "fc.tflite", "--to", "torch:conv", cwd=tmp_path)
    assert done.returncode == 0 and r.code["numpy"] in done.stdout, done.stderr


@pytest.mark.parametrize("family", ["conv", "depthwise", "conv_transpose"])
def test_tflite_convs(keras, convert, family):
    L = keras.layers
    shape = dict(channels=3, spatial=(6, 5), units=4, kernel_size=(3, 2), stride=2, padding="same")
    layer = L.Conv2D(4, (3, 2), strides=2, padding="same")
    if family == "depthwise":
        shape = dict(channels=3, spatial=(6, 5), kernel_size=(3, 2), multiplier=2)
        layer = L.DepthwiseConv2D((3, 2), depth_multiplier=2)
    elif family == "conv_transpose":
        shape = dict(channels=3, spatial=(3, 4), units=4, kernel_size=(3, 2), stride=2)
        layer = L.Conv2DTranspose(4, (3, 2), strides=2)
    model = convert(keras.Input((*shape["spatial"], 3)), layer)
    keywords = {k: v for k, v in shape.items() if k not in ("channels", "spatial", "units")}
    r = explore(model, f"keras:{family}", **keywords)
    assert r.found, r.reason
    assert r.mapping.equivalent(_plan(f"tflite:{family}", f"keras:{family}", **shape))


def test_tflite_conv1d_is_a_lifted_conv_2d(keras, convert):
    model = convert(keras.Input((7, 3)), keras.layers.Conv1D(4, 3, padding="same"))
    r = explore(model, "keras:conv", kernel_size=3, padding="same")
    assert r.found and r.source.probed.side.kernel_shape == (4, 1, 3, 3)  # TFLite stores (O, 1, W, I)
    w = _random(4, 1, 3, 3)
    expected = _plan("tflite:conv", "keras:conv", channels=3, spatial=(7,), units=4, kernel_size=(3,), padding="same")
    assert np.array_equal(r.mapping.apply(w), expected.apply(w.reshape(4, 3, 3)))


def test_tflite_bad_models(keras, convert):
    L = keras.layers
    two = convert(keras.Input((6,)), L.Dense(4), L.Dense(3))
    with pytest.raises(SpecError, match=r"2 linear ops .*FULLY_CONNECTED, FULLY_CONNECTED"):
        explore(two, "keras:dense")
    with pytest.raises(SpecError, match="does not load in the TFLite interpreter"):
        explore(two[:8] + b"\xff" * 64, "keras:dense")
    with pytest.raises(SpecError, match="0 linear ops"):
        explore(convert(keras.Input((6,)), L.ReLU()), "keras:dense")


def test_tflite_model_fixed_to_one_sample_runs_sample_by_sample(tf, monkeypatch):
    from equivcheck.exploration import runtimes_tflite as runtimes

    w, b = tf.constant(_random(6, 4)), tf.constant(_random(4))
    fn = tf.function(lambda x: tf.matmul(tf.reshape(x, [1, 6]), w) + b,
                     input_signature=[tf.TensorSpec([1, 2, 3], tf.float32)])
    model = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn).convert()
    batches, run = [], runtimes.TfliteSide._run
    monkeypatch.setattr(runtimes.TfliteSide, "_run", lambda self, m, x, n: batches.append(n) or run(self, m, x, n))
    r = explore(model, "keras:dense")  # the (2, 3) map, flattened channels last as Keras does: (in, out) is w.T
    assert r.found and r.code["numpy"] == "w.T"
    assert batches[0] > 1 and 1 in batches  # the batch failed on the fixed Reshape; one sample at a time did not

"""Formats in the API and the CLI: .onnx files, an NHWC ONNX input bridged, a batch fixed in the graph, a Keras
model cast to another dtype, and the one-line errors of check-models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

SHAPE = (2, 3, 8, 6)


@pytest.fixture(scope="module")
def ec(torch, keras):
    import equivcheck

    return equivcheck


@pytest.fixture(scope="module")
def net(torch):
    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 6, 5)).eval()


def _export(torch, model, path, shape):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False)
    return str(path)


def test_cli_takes_onnx_files(ec, net, torch, tmp_path, capsys):
    from equivcheck.cli import main

    a = _export(torch, net, tmp_path / "a.onnx", SHAPE)
    b = _export(torch, net, tmp_path / "b.onnx", SHAPE)
    assert main(["check-models", a, b]) == 0
    assert "onnxruntime a → onnxruntime b: pass" in capsys.readouterr().out


def test_without_model_the_error_names_the_flag(ec, torch, tmp_path, capsys):
    from equivcheck.cli import main

    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    path = tmp_path / "weights.pt"
    torch.save(other.state_dict(), path)
    assert main(["check-models", str(path), str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model MODULE:FACTORY" in err[0], err


def test_an_nhwc_onnx_input_is_bridged(ec, net, torch, tmp_path):
    class Nhwc(torch.nn.Module):  # what tf2onnx makes of a Keras model: channels last outside, NCHW convs inside
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    path = _export(torch, Nhwc().eval(), tmp_path / "nhwc.onnx", (2, 8, 6, 3))
    result = ec.check_models(net, path, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert any("channels last (NHWC)" in n and "bridged" in n for n in result.notes), result.notes


def test_a_batch_fixed_in_the_graph_is_used_and_said(ec, net, torch, tmp_path):
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = net[0], net[3]

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(1, -1))  # batch 1 baked into a Reshape

    path = _export(torch, Fixed().eval(), tmp_path / "fixed.onnx", (1, *SHAPE[1:]))
    result = ec.check_models(net, path, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert result.input_shape[0] == 1
    assert any("fixes its batch at 1" in n for n in result.notes), result.notes


def test_a_keras_model_is_cast_to_the_dtype_asked(ec, net, keras):
    p = {k: v.numpy() for k, v in net.state_dict().items()}
    inp = keras.Input((8, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(keras.layers.Permute((3, 1, 2))(h))
    model = keras.Model(inp, keras.layers.Dense(5, name="fc")(h))
    model.get_layer("conv").set_weights([p["0.weight"].transpose(2, 3, 1, 0), p["0.bias"]])
    model.get_layer("fc").set_weights([p["3.weight"].T, p["3.bias"]])
    result = ec.check_models(net, model, input_shape=SHAPE, dtypes=("float32", "float16"))
    assert result.verdict == "pass", result.render()
    assert {r.dtype for r in result.layers} == {"float32", "float16"}
    assert any("rebuilt in float16 from its config" in n for n in result.notes), result.notes
    assert model.get_layer("conv").dtype_policy.compute_dtype == "float32"  # the user's model is left as it was
    assert np.asarray(model.get_layer("conv").kernel).dtype == np.float32


def _keras_cnn(keras):
    inp = keras.Input((8, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, name="dw")(h)
    model = keras.Model(inp, keras.layers.Dense(5, name="fc")(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(5)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_tflite_models_are_checked_both_ways(ec, keras, tf, tmp_path):
    model = _keras_cnn(keras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        path = tmp_path / "cnn.tflite"
        path.write_bytes(data)
        result = ec.check_models(model, str(path))
    assert result.verdict == "pass", result.render()
    assert [r.kind for r in result.layers] == ["conv", "depthwise", "dense"]
    assert result.layers[2].boundary == "flattened HWC"
    wrong = _keras_cnn(keras)
    kernel, bias = wrong.get_layer("conv").get_weights()
    wrong.get_layer("conv").set_weights([kernel[::-1, ::-1].copy(), bias])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = ec.check_models(data, wrong)
    assert back.verdict == "fail" and back.first_divergence.converted == "conv", back.render()
    assert "flip" in back.first_divergence.mistake

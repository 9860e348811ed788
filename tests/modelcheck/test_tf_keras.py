"""Keras 2 (``tf_keras``) models in ``check_models``, ``check_model_converter`` and ``check-models``: in memory, ``.h5``
and ``.keras`` files, on the real tf_keras. The converters are written here, independently of equivcheck."""

from __future__ import annotations

import sys

import pytest

SHAPE = (2, 3, 12, 8)


@pytest.fixture(scope="module")
def tf_keras(tf):
    return pytest.importorskip("tf_keras", reason="tf_keras not installed: pip install 'equivcheck[tfkeras]'")


@pytest.fixture(scope="module")
def ec(torch, tf_keras):
    import equivcheck

    return equivcheck


def make_net():
    """conv, BN, relu, pool, depthwise, strided conv, relu as a function, flatten, linear."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        input_shape = SHAPE[1:]

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
            self.fc = nn.Linear(6 * 3 * 2, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn(self.conv(x))))
            x = torch.relu(self.conv2(torch.relu(self.dw(x))))
            return self.fc(torch.flatten(x, 1))

    net = Net().eval()
    with torch.no_grad():  # statistics far from 0 and 1, so a swap or a missed copy shows
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
        net.bn.bias.uniform_(-1, 1)
    return net


def to_tf_keras(net, mistake: str | None = None):
    """The user's port: channels last, a pad layer before the strided conv, a Permute to CHW before Flatten."""
    import tf_keras

    L = tf_keras.layers
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    inp = tf_keras.Input(SHAPE[2:] + SHAPE[1:2])
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(epsilon=1e-5, name="bn")(x)
    x = L.MaxPooling2D(2)(L.ReLU()(x))
    x = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = L.Conv2D(6, 3, strides=2, activation="relu", name="conv2")(L.ZeroPadding2D(1)(x))
    x = L.Dense(5, name="fc")(L.Flatten()(L.Permute((3, 1, 2))(x)))
    model = tf_keras.Model(inp, x, name="net_tfk")
    conv2 = sd["conv2.weight"].transpose(2, 3, 1, 0)
    if mistake == "transpose":  # kernel H and W exchanged
        conv2 = sd["conv2.weight"].transpose(3, 2, 1, 0)
    fc = sd["fc.weight"].T
    if mistake == "flatten":  # rows put in HWC order although the graph flattens CHW
        fc = sd["fc.weight"].reshape(5, 6, 3, 2).transpose(0, 2, 3, 1).reshape(5, 36).T
    model.get_layer("conv").set_weights([sd["conv.weight"].transpose(2, 3, 1, 0), sd["conv.bias"]])
    model.get_layer("bn").set_weights([sd["bn.weight"], sd["bn.bias"], sd["bn.running_mean"], sd["bn.running_var"]])
    model.get_layer("dw").set_weights([sd["dw.weight"].transpose(2, 3, 0, 1), sd["dw.bias"]])
    model.get_layer("conv2").set_weights([conv2, sd["conv2.bias"]])
    model.get_layer("fc").set_weights([fc, sd["fc.bias"]])
    return model


def test_importing_equivcheck_imports_no_tf_keras():
    import subprocess

    code = "import sys, equivcheck, equivcheck.modelcheck.sides; print('tf_keras' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_right_port_passes_with_every_layer_checked(ec):
    result = ec.check_model_converter(to_tf_keras, source=make_net)
    assert result.verdict == "pass", result.render()
    assert result.converted.startswith("tf_keras net_tfk")
    assert [row.source for row in result.layers] == ["conv", "bn", "dw", "conv2", "fc"]
    assert not result.unchecked


@pytest.mark.parametrize(("mistake", "layer", "named"), [("flatten", "fc", "flatten order"),
                                                          ("transpose", "conv2", "H and W of the kernel exchanged")])
def test_a_planted_mistake_is_named_at_its_layer(ec, mistake, layer, named):
    with pytest.raises(ec.ConversionCheckFailed) as failed:
        ec.check_model_converter(lambda net: to_tf_keras(net, mistake), source=make_net)
    assert f"first divergence: {layer} ↔ {layer}" in str(failed.value)
    result = ec.check_models(make_net(), to_tf_keras(make_net(), mistake))
    assert result.verdict == "fail" and result.first_divergence.source == layer
    assert [row.source for row in result.layers if row.verdict == "fail"] == [layer]
    assert named in result.first_divergence.diagnosis


def test_tf_keras_as_the_source(ec):
    result = ec.check_models(to_tf_keras(make_net()), make_net(), input_shape=(2, 12, 8, 3))
    assert result.verdict == "pass", result.render()
    assert result.source.startswith("tf_keras")


def test_an_unbuilt_model_is_one_line(ec, tf_keras):
    sub = tf_keras.Sequential([tf_keras.layers.Dense(3)])
    with pytest.raises(ec.EquivcheckError) as err:
        ec.check_models(make_net(), sub)
    assert "not built" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_h5_round_trip_through_the_cli(ec, torch, tmp_path, capsys):
    from equivcheck.cli import main
    from equivcheck.modelcheck import examples

    def vgg_to_tf_keras(model, flatten="right"):
        import tf_keras

        L, w = tf_keras.layers, {k: v.detach().numpy() for k, v in model.state_dict().items()}
        inp = tf_keras.Input((12, 10, 3))
        x = L.MaxPooling2D(2)(L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp))
        x = L.MaxPooling2D(2)(L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x))
        x = L.Dense(8, activation="relu", name="fc1")(L.Flatten()(x))
        out = tf_keras.Model(inp, L.Dense(5, name="fc2")(x), name="vgg_tfk")
        out.get_layer("conv1").set_weights([w["features.0.weight"].transpose(2, 3, 1, 0), w["features.0.bias"]])
        out.get_layer("conv2").set_weights([w["features.3.weight"].transpose(2, 3, 1, 0), w["features.3.bias"]])
        k = w["classifier.0.weight"]
        k = k.reshape(8, 6, 3, 2).transpose(2, 3, 1, 0).reshape(36, 8) if flatten == "right" else k.T
        out.get_layer("fc1").set_weights([k, w["classifier.0.bias"]])
        out.get_layer("fc2").set_weights([w["classifier.3.weight"].T, w["classifier.3.bias"]])
        return out

    vgg = examples.torch_vgg()
    torch.save(vgg.state_dict(), tmp_path / "src.pt")
    vgg_to_tf_keras(vgg).save(tmp_path / "right.h5")
    vgg_to_tf_keras(vgg, flatten="wrong").save(tmp_path / "wrong.h5")
    common = ["--model", "equivcheck.modelcheck.examples:torch_vgg", "--input-shape", "2,3,12,10"]
    assert main(["check-models", str(tmp_path / "src.pt"), str(tmp_path / "right.h5"), *common]) == 0
    assert "torch SmallVGG → tf_keras vgg_tfk: pass" in capsys.readouterr().out
    assert main(["check-models", str(tmp_path / "src.pt"), str(tmp_path / "wrong.h5"), *common]) == 1
    out = capsys.readouterr().out
    assert "FAIL: first wrong layer classifier.0" in out and "flatten order" in out
    # the API takes the .h5 path as it takes an .onnx one
    assert ec.check_models(vgg, str(tmp_path / "right.h5"), input_shape=examples.SHAPE).verdict == "pass"


def test_a_keras_file_tf_keras_wrote_loads_with_tf_keras(ec, tmp_path):
    from equivcheck.modelcheck.commands import load_model

    to_tf_keras(make_net()).save(tmp_path / "net.keras")
    model = load_model(tmp_path / "net.keras")
    assert type(model).__module__.startswith("tf_keras")
    assert ec.check_models(make_net(), model).verdict == "pass"


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_a_missing_broken_or_unsafe_h5_is_one_line(ec, tf_keras, tmp_path):
    from equivcheck.modelcheck.commands import load_model

    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    inp = tf_keras.Input((4,))
    out = tf_keras.layers.Lambda(lambda x: x * 2, name="times_two")(tf_keras.layers.Dense(3)(inp))
    tf_keras.Model(inp, out).save(tmp_path / "lambda.h5")  # legacy HDF5 loading would run the lambda's code
    for path in (tmp_path / "absent.h5", tmp_path / "broken.h5", tmp_path / "lambda.h5"):
        with pytest.raises(ec.EquivcheckError) as err:
            load_model(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "Lambda layer 'times_two'" in str(err.value)


@pytest.mark.parametrize(("mistake", "layer"), [("flatten", "fc"), ("transpose", "conv2")])
def test_repair_fixes_a_tf_keras_port_and_proves_it(ec, tf_keras, tmp_path, mistake, layer):
    import numpy as np

    net = make_net()
    wrong = to_tf_keras(net, mistake)
    before = [w.copy() for w in wrong.get_weights()]
    result = ec.check_models(net, wrong)
    assert result.verdict == "fail"
    fixed = result.repair()
    assert fixed.passed, fixed.check.render()
    assert isinstance(fixed.model, tf_keras.Model) and fixed.model is not wrong
    assert [f.converted for f in fixed.patch.fixes] == [layer] and fixed.patch.framework == "tf_keras"
    assert fixed.patch.fixes[0].parameters == (f"{layer}/kernel", f"{layer}/bias")
    assert all(np.array_equal(a, b) for a, b in zip(before, wrong.get_weights()))  # the original is untouched
    x = np.random.default_rng(0).standard_normal((2, 12, 8, 3)).astype(np.float32)
    import torch

    with torch.no_grad():
        y = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.allclose(fixed.model(x).numpy(), y, rtol=1e-4, atol=1e-5)
    assert "converted_model.get_layer" in result.patch().code()
    if mistake == "flatten":
        return
    path = tmp_path / "wrong.h5"  # an .h5 file: read afresh, repaired as a model of its own
    wrong.save(str(path))
    from_file = ec.check_models(net, str(path), input_shape=SHAPE)
    assert from_file.verdict == "fail" and from_file.repair().passed

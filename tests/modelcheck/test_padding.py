"""Pad layers (Keras ZeroPadding1-3D, nn.ZeroPad2d, F.pad, ONNX Pad) are merged into the conv they feed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ec(torch, keras):
    import equivcheck

    return equivcheck


def _torch_net(torch, rank=2):
    torch.manual_seed(rank)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[rank]
    spatial = {1: (9,), 2: (8, 10), 3: (5, 6, 4)}[rank]
    out = [(n + 2 - 3) // 2 + 1 for n in spatial]
    net = torch.nn.Sequential(conv(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * int(np.prod(out)), 3)).eval()
    return net, (2, 3, *spatial)


def _keras_port(net, keras, shape, pads):
    """Conv{n}d(stride=2, padding=1) ported as ZeroPadding{n}D + Conv{n}D(padding='valid'), flatten fixed by Permute."""
    rank = len(shape) - 2
    inp = keras.Input((*shape[2:], shape[1]))
    h = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D, 3: keras.layers.ZeroPadding3D}[rank](pads)(inp)
    conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
    h = conv(4, 3, strides=2, padding="valid", activation="relu", name="conv")(h)
    h = keras.layers.Permute((rank + 1, *range(1, rank + 1)))(h)
    out = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    w = net[0].weight.detach().numpy()
    model.get_layer("conv").set_weights([w.transpose(*range(2, 2 + rank), 1, 0), net[0].bias.detach().numpy()])
    model.get_layer("fc").set_weights([net[3].weight.detach().numpy().T, net[3].bias.detach().numpy()])
    return model


@pytest.mark.parametrize("rank, pads", [(1, 1), (2, 1), (2, ((1, 1), (1, 1))), (3, 1)])
def test_the_usual_pad_layer_port_passes_both_ways(ec, torch, keras, rank, pads):
    net, shape = _torch_net(torch, rank)
    port = _keras_port(net, keras, shape, pads)
    for source, converted, kw in ((net, port, {"input_shape": shape}), (port, net, {})):
        result = ec.check_models(source, converted, **kw)
        assert result.verdict == "pass", result.render()
        assert "pads " in result.layers[0].notes[0] and "merged into it" in result.layers[0].notes[0]


def test_a_pad_on_the_wrong_side_is_named(ec, torch, keras):
    net, shape = _torch_net(torch)
    result = ec.check_models(net, _keras_port(net, keras, shape, ((0, 2), (0, 2))), input_shape=shape)
    assert result.verdict == "fail"
    first = result.first_divergence
    assert (first.source, first.converted, first.mistake) == ("0", "conv", "pad on the wrong side")
    assert "((1, 1), (1, 1))" in first.diagnosis and "((0, 2), (0, 2))" in first.diagnosis
    assert "right mapping" not in first.headline()


def test_a_pad_of_another_size_is_named(ec, torch, keras):
    net, shape = _torch_net(torch)
    result = ec.check_models(net, _keras_port(net, keras, shape, ((0, 1), (0, 1))), input_shape=shape)
    assert result.verdict == "fail" and result.first_divergence.mistake == "padding differs"


def _functional_pad(torch, net, module: bool):
    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pad = torch.nn.ZeroPad2d(1) if module else None
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.fc = torch.nn.Linear(net[3].in_features, 3)
            self.conv.load_state_dict(net[0].state_dict())
            self.fc.load_state_dict(net[3].state_dict())

        def forward(self, x):
            x = self.pad(x) if self.pad is not None else torch.nn.functional.pad(x, (1, 1, 1, 1))
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    return Padded().eval()


@pytest.mark.parametrize("module", [True, False], ids=["ZeroPad2d", "F.pad"])
def test_torch_pad_modules_and_functions(ec, torch, module):
    net, shape = _torch_net(torch)
    result = ec.check_models(net, _functional_pad(torch, net, module), input_shape=shape)
    assert result.verdict == "pass", result.render()
    assert result.layers[0].notes[0].startswith("converted graph pads ((1, 1), (1, 1))")


def test_onnx_pad_nodes(ec, torch, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    net, shape = _torch_net(torch)
    path = tmp_path / "padded.onnx"
    torch.onnx.export(_functional_pad(torch, net, False), (torch.zeros(shape),), str(path), dynamo=False)
    import onnx

    assert "Pad" in {n.op_type for n in onnx.load(str(path)).graph.node}
    result = ec.check_models(net, str(path), input_shape=shape)
    assert result.verdict == "pass", result.render()
    assert "merged into it" in result.layers[0].notes[0]

"""Layouts through functional ops: torch.relu called as a function between the last conv and the flatten."""

from __future__ import annotations

import pytest

SHAPE = (2, 3, 7, 6)


@pytest.fixture(scope="module")
def models(torch, keras):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 5 * 4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))  # no module sees the ReLU

    torch.manual_seed(3)
    net = Net().eval()
    p = {k: v.numpy() for k, v in net.state_dict().items()}

    def port(right: bool):
        inp = keras.Input((7, 6, 3))
        h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp))
        model = keras.Model(inp, keras.layers.Dense(3, name="fc")(h))
        model.get_layer("conv").set_weights([p["conv.weight"].transpose(2, 3, 1, 0), p["conv.bias"]])
        w = p["fc.weight"]
        kernel = w.reshape(3, 4, 5, 4).transpose(2, 3, 1, 0).reshape(80, 3) if right else w.T
        model.get_layer("fc").set_weights([kernel, p["fc.bias"]])
        return model

    return net, port


def test_the_flatten_order_is_read_through_a_functional_relu(models):
    import equivcheck as ec

    net, port = models
    right = ec.check_models(net, port(True), input_shape=SHAPE)
    assert right.verdict == "pass", right.render()
    assert right.layers[1].boundary == "flattened CHW → HWC"
    wrong = ec.check_models(net, port(False), input_shape=SHAPE)
    assert wrong.verdict == "fail"
    first = wrong.first_divergence
    assert (first.source, first.converted) == ("fc", "fc")
    assert first.diagnosis.startswith("wrong flatten order (CHW read as HWC)"), first.diagnosis
    assert "right mapping w.reshape(" in first.headline()  # verified by re-running the layer with it


def test_monotone_functions_give_one_order_and_a_dead_map_none():
    import numpy as np

    from equivcheck.modelcheck.layers import flatten_order

    rng = np.random.default_rng(0)
    m = rng.standard_normal((2, 4, 3, 5))
    for f in (lambda a: np.maximum(a, 0), np.tanh, lambda a: 1 / (1 + np.exp(-a)), lambda a: np.where(a > 0, a, 0.1 * a)):
        assert flatten_order(m, "CHW", f(m.transpose(0, 2, 3, 1)).reshape(2, -1)) == "HWC"
        assert flatten_order(m, "CHW", f(m).reshape(2, -1)) == "CHW"
    assert flatten_order(m, "CHW", np.sin(3 * m).reshape(2, -1)) is None  # not monotone: no order claimed
    assert flatten_order(np.zeros_like(m), "CHW", np.zeros((2, 60))) is None  # dead: every order fits


def test_a_functional_pooling_before_the_flatten_assumes_and_says_the_native_order(torch, keras):
    import equivcheck as ec

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 3 * 2, 3)

        def forward(self, x):  # the pooled map is no module's output: the hooks never see it
            return self.fc(torch.flatten(torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))

    torch.manual_seed(0)
    net = Pooled().eval()
    p = {k: v.numpy() for k, v in net.state_dict().items()}

    def port(right: bool):
        inp = keras.Input((8, 6, 3))
        h = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp))
        model = keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h)))
        model.get_layer("conv").set_weights([p["conv.weight"].transpose(2, 3, 1, 0), p["conv.bias"]])
        w = p["fc.weight"]
        kernel = w.reshape(3, 4, 3, 2).transpose(2, 3, 1, 0).reshape(24, 3) if right else w.T
        model.get_layer("fc").set_weights([kernel, p["fc.bias"]])
        return model

    right = ec.check_models(net, port(True), input_shape=(2, 3, 8, 6))
    assert right.verdict == "pass", right.render()
    assert "torch's own flatten order CHW assumed" in right.layers[1].notes[0]
    wrong = ec.check_models(net, port(False), input_shape=(2, 3, 8, 6)).first_divergence
    assert wrong.converted == "fc" and wrong.diagnosis.startswith("wrong flatten order (CHW read as HWC)")

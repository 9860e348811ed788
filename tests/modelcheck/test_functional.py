"""Layouts through functional ops, read from the torch graph (torch.fx): torch.relu called as a function between
the last conv and the flatten, a functional pooling, a permute before the reshape; an untraceable model falls back to
the captured activations and says so."""

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
    assert "source fc reads the map of conv flattened CHW (relu, flatten): traced from the graph (torch.fx)" in right.notes
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


def _pooled_pair(torch, keras, forward, *, hwc: bool = False):
    """A torch conv -> functional pooling -> flatten -> linear model (``forward`` wires it) and its Keras ports:
    ``port(True)`` right, ``port(False)`` with the kernel rows in the other flatten order."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 3 * 2, 3)

        def forward(self, x):
            return forward(self, x)

    torch.manual_seed(0)
    net = Pooled().eval()
    p = {k: v.numpy() for k, v in net.state_dict().items()}

    def port(right: bool):
        inp = keras.Input((8, 6, 3))
        h = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp))
        model = keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(h)))
        model.get_layer("conv").set_weights([p["conv.weight"].transpose(2, 3, 1, 0), p["conv.bias"]])
        w = p["fc.weight"]
        chw_to_hwc = w.reshape(3, 4, 3, 2).transpose(2, 3, 1, 0).reshape(24, 3)
        kernel = (w.T if hwc else chw_to_hwc) if right else (chw_to_hwc if hwc else w.T)
        model.get_layer("fc").set_weights([kernel, p["fc.bias"]])
        return model

    return net, port


def test_a_functional_pooling_before_the_flatten_is_traced(torch, keras):
    import equivcheck as ec

    def forward(self, x):  # the pooled map is no module's output: the hooks never see it, the graph does
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))

    net, port = _pooled_pair(torch, keras, forward)
    right = ec.check_models(net, port(True), input_shape=(2, 3, 8, 6))
    assert right.verdict == "pass", right.render()
    assert ("source fc reads the map of conv flattened CHW (relu, max_pool2d, flatten): traced from the graph "
            "(torch.fx)") in right.notes
    assert not any("assumed" in n for n in right.layers[1].notes), right.layers[1].notes  # read, not assumed
    wrong = ec.check_models(net, port(False), input_shape=(2, 3, 8, 6)).first_divergence
    assert wrong.converted == "fc" and wrong.diagnosis.startswith("wrong flatten order (CHW read as HWC)")


def test_permute_then_reshape_reads_hwc_from_the_graph(torch, keras):
    """``x.permute(0, 2, 3, 1).reshape(n, -1)`` after a functional pooling: the linear reads HWC, as Keras'
    Flatten of a channels-last map does. No captured map holds the pooled values, so only the graph can tell: the
    native order CHW, assumed, would fail the right port."""
    import equivcheck as ec

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.permute(0, 2, 3, 1).reshape(h.size(0), -1))

    net, port = _pooled_pair(torch, keras, forward, hwc=True)
    right = ec.check_models(net, port(True), input_shape=(2, 3, 8, 6))
    assert right.verdict == "pass", right.render()
    assert right.layers[1].boundary == "flattened HWC"  # the same order on both sides
    assert any(n.startswith("source fc reads the map of conv flattened HWC (relu, max_pool2d, permute, reshape)")
               for n in right.notes), right.notes
    wrong = ec.check_models(net, port(False), input_shape=(2, 3, 8, 6))
    assert wrong.verdict == "fail"
    first = wrong.first_divergence
    assert (first.source, first.converted) == ("fc", "fc")
    assert first.diagnosis.startswith("wrong flatten order"), first.diagnosis


def test_an_untraceable_model_falls_back_to_the_activations_and_says_so(torch, keras):
    """A data-dependent ``if``: torch.fx cannot trace it. The layout is judged from the captured activations (the
    pooled map was never captured: torch's own order assumed, and said), and the notes say the graph was not read."""
    import equivcheck as ec

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        if h.sum() < 0:  # never true after a ReLU, but fx cannot know
            h = -h
        return self.fc(torch.flatten(h, 1))

    net, port = _pooled_pair(torch, keras, forward)
    right = ec.check_models(net, port(True), input_shape=(2, 3, 8, 6))
    assert right.verdict == "pass", right.render()
    untraced = [n for n in right.notes if n.startswith(f"source torch model {type(net).__name__} not traced: ")]
    assert len(untraced) == 1 and untraced[0].endswith("; layout judged from captured activations"), right.notes
    assert "control flow" in untraced[0]  # the reason, from torch.fx
    assert "torch's own flatten order CHW assumed" in right.layers[1].notes[0]
    wrong = ec.check_models(net, port(False), input_shape=(2, 3, 8, 6)).first_divergence
    assert wrong.converted == "fc" and wrong.diagnosis.startswith("wrong flatten order (CHW read as HWC)")


def _functional():
    import torch

    return torch.nn.functional


def _layouts(torch, head, features=60, shape=(2, 4, 3, 5)):
    """What the graph gives for a linear reading ``head(net, h)`` of a 1x1 conv's (N, 4, 3, 5) map."""
    import numpy as np

    from equivcheck.modelcheck.adapters import TorchAdapter

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(shape[1], 4, 1)
            self.flat = torch.nn.Flatten()
            self.fc = torch.nn.Linear(features, 3)

        def forward(self, x):
            return self.fc(head(self, self.conv(x)))

    adapter = TorchAdapter(Net().eval(), "source")
    _, records = adapter.run(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    fc = next(r for r in records if r.name == "fc")
    return fc.layout, adapter.notes


@pytest.mark.parametrize(("head", "flatten"), [
    (lambda net, h: h.view(h.size(0), -1), "CHW"),
    (lambda net, h: net.flat(h.relu()), "CHW"),
    (lambda net, h: h.transpose(1, 3).contiguous().reshape(h.shape[0], -1), "WHC"),
    (lambda net, h: h.movedim(1, -1).flatten(2).flatten(1), "HWC"),
    (lambda net, h: _functional().silu(h.permute(0, 1, 3, 2)).sigmoid().reshape(h.size(0), -1), "CWH"),
])
def test_the_graph_gives_each_flatten_order(torch, head, flatten):
    layout, notes = _layouts(torch, head)
    assert (layout.flatten, layout.map_shape) == (flatten, (4, 3, 5)), notes
    assert any(f"flattened {flatten}" in n and n.endswith("traced from the graph (torch.fx)") for n in notes), notes


def test_a_map_one_position_wide_is_read_as_plain_features(torch):
    layout, notes = _layouts(torch, lambda net, h: _functional().adaptive_avg_pool2d(h, 1).flatten(1), features=4)
    assert layout.is_flat and layout.map_shape == (4,) and not notes  # every flatten order is the same memory


def test_an_op_the_trace_does_not_follow_is_named_and_the_activations_decide(torch):
    layout, notes = _layouts(torch, lambda net, h: _functional().pad(h, (0, 0, 0, 0)).flatten(1))
    assert layout.flatten == "CHW"  # the padded map is the conv's output, captured: its values give the order
    assert any(n.startswith("source fc: not traced (pad is not followed by the trace); layout judged from captured "
                            "activations") for n in notes), notes

"""Norm layers as checked pairs (torch, Keras 3, ONNX): replayed alone, their mistakes named from the parameters."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

SHAPE = (2, 3, 8, 10)


@pytest.fixture(scope="module")
def ec(torch, keras):
    import equivcheck

    return equivcheck


@pytest.fixture(scope="module")
def net(torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.Linear(4 * 6 * 8, 5), nn.LayerNorm(5), nn.BatchNorm1d(5), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model


def _port(net, keras, *, ln_eps=1e-5, bn=lambda p: [p["2.weight"], p["2.bias"], p["2.running_mean"], p["2.running_var"]]):
    """The torch model in Keras (NHWC), a Permute restoring torch's flatten order."""
    p = {k: v.numpy() for k, v in net.state_dict().items()}
    L = keras.layers
    inp = keras.Input((8, 10, 3))
    h = L.ReLU()(L.Conv2D(4, 3, name="conv")(inp))
    h = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(h)
    h = L.GroupNormalization(2, epsilon=1e-5, name="gn")(h)
    h = L.Dense(5, name="fc")(L.Flatten()(L.Permute((3, 1, 2))(h)))
    h = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn1")(L.LayerNormalization(epsilon=ln_eps, name="ln")(h))
    model = keras.Model(inp, L.Dense(2, name="fc2")(h))
    model.get_layer("conv").set_weights([p["0.weight"].transpose(2, 3, 1, 0), p["0.bias"]])
    model.get_layer("bn").set_weights(bn(p))
    model.get_layer("gn").set_weights([p["3.weight"], p["3.bias"]])
    model.get_layer("fc").set_weights([p["5.weight"].T, p["5.bias"]])
    model.get_layer("ln").set_weights([p["6.weight"], p["6.bias"]])
    model.get_layer("bn1").set_weights([p["7.weight"], p["7.bias"], p["7.running_mean"], p["7.running_var"]])
    model.get_layer("fc2").set_weights([p["8.weight"].T, p["8.bias"]])
    return model


def test_norm_layers_are_checked_pairs_both_ways(ec, net, keras):
    port = _port(net, keras)
    result = ec.check_models(net, port, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted, r.kind) for r in result.layers if "norm" in r.kind] == [
        ("2", "bn", "batchnorm"), ("3", "gn", "groupnorm"), ("6", "ln", "layernorm"), ("7", "bn1", "batchnorm")]
    assert not result.unchecked
    back = ec.check_models(port, net)
    assert back.verdict == "pass", back.render()


@pytest.mark.parametrize("plant, layer, mistake, words", [
    ("swap_stats", "bn", "mean and variance swapped", ()),
    ("swap_affine", "bn", "gamma and beta swapped", ()),
    ("not_copied", "bn", "statistics not copied", ("initial values",)),
    ("ln_eps", "ln", "eps differs", ("1e-05", "0.001")),
])
def test_norm_mistakes_are_named_at_their_layer(ec, net, keras, plant, layer, mistake, words):
    bn = {"swap_stats": lambda p: [p["2.weight"], p["2.bias"], p["2.running_var"], p["2.running_mean"]],
          "swap_affine": lambda p: [p["2.bias"], p["2.weight"], p["2.running_mean"], p["2.running_var"]],
          "not_copied": lambda p: [p["2.weight"], p["2.bias"], np.zeros(4, np.float32), np.ones(4, np.float32)],
          }.get(plant, lambda p: [p["2.weight"], p["2.bias"], p["2.running_mean"], p["2.running_var"]])
    result = ec.check_models(net, _port(net, keras, bn=bn, ln_eps=1e-3 if plant == "ln_eps" else 1e-5),
                             input_shape=SHAPE)
    assert result.verdict == "fail"
    first = result.first_divergence
    assert first.converted == layer and first.mistake == mistake, result.render()
    assert all(w in first.diagnosis for w in words), first.diagnosis
    later = [r for r in result.layers if r.position[0] > first.position[0]]
    assert later and all(r.verdict == "pass" for r in later)  # replayed alone: nothing accumulates


def test_momentum_is_a_training_note_not_a_failure(ec, net, keras):
    port = _port(net, keras)
    port.get_layer("bn1").momentum = 0.99  # Keras keeps 0.99 per step, torch (momentum 0.1) 0.9
    bn1 = next(r for r in ec.check_models(net, port, input_shape=SHAPE).layers if r.converted == "bn1")
    assert bn1.verdict == "pass" and "momentum differs (training only" in " ".join(bn1.notes)


def test_onnx_norm_nodes_pair_and_a_folded_batch_norm_is_recognised(ec, net, torch, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'equivcheck[onnx]'")
    import onnx

    path = tmp_path / "norms.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(SHAPE),), str(path), dynamo=False, opset_version=17)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 2 and "LayerNormalization" in ops
    result = ec.check_models(net, str(path), input_shape=SHAPE)
    kinds = {(r.source, r.kind, r.verdict) for r in result.layers}
    assert {("2", "batchnorm", "pass"), ("6", "layernorm", "pass"), ("7", "batchnorm", "pass")} <= kinds
    # torch exports GroupNorm as InstanceNormalization + Mul + Add: named, not passed over
    assert result.verdict == "inconclusive" and "InstanceNormalization" in result.reason

    nn = torch.nn
    fused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 8, 5)).eval()
    with torch.no_grad():
        fused[1].running_mean.uniform_(-1, 1)
        fused[1].running_var.uniform_(0.5, 2)
    folded = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (torch.zeros(SHAPE),), str(folded), dynamo=False)
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(folded)).graph.node]
    result = ec.check_models(fused, str(folded), input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert result.layers[0].source == "0+1" and "folded source batch norm 1" in result.layers[0].notes[0]
    back = ec.check_models(str(folded), fused)  # the fused graph as the source: the torch batch norm folded to match
    assert back.verdict == "pass", back.render()
    assert back.layers[0].converted == "0+1" and "batch norm 1 folded in" in back.layers[0].notes[0]


def test_a_dropped_batch_norm_is_not_passed_as_folded(ec, torch):
    nn = torch.nn
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 8, 5)).eval()
    with torch.no_grad():
        src[1].running_mean.uniform_(-1, 1)
        src[1].running_var.uniform_(0.5, 2)
    dropped = nn.Sequential(copy.deepcopy(src[0]), nn.ReLU(), nn.Flatten(), copy.deepcopy(src[4])).eval()
    result = ec.check_models(src, dropped, input_shape=SHAPE)
    assert result.verdict == "fail"
    assert any("source batch norm 1" in n for r in result.layers for n in r.notes) or \
        any(u.name == "1" for u in result.unchecked)


def test_flax_norm_layers_pair_with_torch(ec, torch):
    jax = pytest.importorskip("jax", reason="jax not installed: pip install 'equivcheck[jax]'")
    linen = pytest.importorskip("flax.linen", reason="flax not installed: pip install 'equivcheck[jax]'")

    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(linen.Conv(4, (3, 3), name="conv")(x))
            x = linen.GroupNorm(num_groups=2, epsilon=1e-5, name="gn")(linen.relu(x))
            x = linen.Dense(5, name="fc")(x.reshape((x.shape[0], -1)))
            return linen.LayerNorm(epsilon=1e-5, name="ln")(x)

    module = CNN()
    variables = jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(0), np.zeros((2, 6, 5, 3), np.float32)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables)
    p, st = variables["params"], variables["batch_stats"]
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4), nn.Flatten(),
                        nn.Linear(4 * 6 * 5, 5), nn.LayerNorm(5)).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        net[0].weight.copy_(t(p["conv"]["kernel"].transpose(3, 2, 0, 1)))
        net[0].bias.copy_(t(p["conv"]["bias"]))
        net[1].weight.copy_(t(p["bn"]["scale"]))
        net[1].bias.copy_(t(p["bn"]["bias"]))
        net[1].running_mean.copy_(t(st["bn"]["mean"]))
        net[1].running_var.copy_(t(st["bn"]["var"]))
        net[3].weight.copy_(t(p["gn"]["scale"]))
        net[3].bias.copy_(t(p["gn"]["bias"]))
        net[5].weight.copy_(t(p["fc"]["kernel"].reshape(6, 5, 4, 5).transpose(3, 2, 0, 1).reshape(5, 120)))
        net[5].bias.copy_(t(p["fc"]["bias"]))
        net[6].weight.copy_(t(p["ln"]["scale"]))
        net[6].bias.copy_(t(p["ln"]["bias"]))
    result = ec.check_models((module, variables), net, input_shape=(2, 6, 5, 3))
    assert result.verdict == "pass", result.render()
    assert [r.kind for r in result.layers] == ["conv", "batchnorm", "groupnorm", "dense", "layernorm"]
    with torch.no_grad():
        net[1].running_var.copy_(t(st["bn"]["mean"]))
        net[1].running_mean.copy_(t(st["bn"]["var"]))
    first = ec.check_models((module, variables), net, input_shape=(2, 6, 5, 3)).first_divergence
    assert (first.source, first.mistake) == ("bn", "mean and variance swapped")


def _one_pass(x, g, b, eps):
    """A float32 layer norm whose variance is E[x²] - E[x]² (Flax's use_fast_variance), clipped at zero."""
    mu = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    var = np.maximum((x * x).mean(axis=-1, keepdims=True, dtype=np.float32) - mu * mu, np.float32(0))
    return ((x - mu) / np.sqrt(var + np.float32(eps)) * g + b).astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 30.0, 3000.0])
def test_one_pass_variance_is_inside_the_bound_and_norm_mistakes_still_fail(offset):
    from equivcheck.modelcheck.norms import judge_norm, reference

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 16)) + offset).astype(np.float32)
    g, b = rng.uniform(0.5, 2, 16).astype(np.float32), rng.uniform(-1, 1, 16).astype(np.float32)
    exact, mag, n = reference("layernorm", x, g, b, {"eps": 1e-5})
    assert judge_norm(_one_pass(x, g, b, 1e-5), exact, mag, n, "float32").passed
    assert judge_norm(exact.astype(np.float32), exact, mag, n, "float32").passed
    # on designed data (zero-mean, dense) the bound stays tight: eps and affine mistakes fail by far
    d = rng.standard_normal((6, 16)).astype(np.float32)
    exact_d, mag_d, _ = reference("layernorm", d, g, b, {"eps": 1e-5})
    for wrong in (_one_pass(d, g, b, 1e-3), _one_pass(d, b, g, 1e-5), _one_pass(d, g, b, 1e-5) * 1.001):
        assert judge_norm(wrong, exact_d, mag_d, n, "float32").max_error_ratio > 4
    # group norm: the same one-pass variance per group
    xg = (rng.standard_normal((2, 4, 3, 5)) + offset).astype(np.float32)  # (N, C, H, W), 2 groups
    gg, bg = g[:4], b[:4]
    exact_g, mag_g, ng = reference("groupnorm", xg, gg, bg, {"eps": 1e-5, "groups": 2})
    grouped = xg.reshape(2, 2, -1)
    mu = grouped.mean(axis=-1, keepdims=True, dtype=np.float32)
    var = np.maximum((grouped * grouped).mean(axis=-1, keepdims=True, dtype=np.float32) - mu * mu, np.float32(0))
    yg = ((grouped - mu) / np.sqrt(var + np.float32(1e-5))).reshape(xg.shape) * gg[:, None, None] + bg[:, None, None]
    assert judge_norm(yg.astype(np.float32), exact_g, mag_g, ng, "float32").passed


@pytest.mark.parametrize("fast", [True, False])
def test_flax_layer_and_group_norm_outputs_are_inside_the_bound(jax, fast):
    linen = pytest.importorskip("flax.linen", reason="flax not installed: pip install 'equivcheck[jax]'")
    from equivcheck.modelcheck.norms import judge_norm, reference

    rng = np.random.default_rng(2)
    for offset in (0.0, 50.0, 5000.0):
        x = (rng.standard_normal((4, 3, 2, 8)) + offset).astype(np.float32)  # NHWC
        g, b = rng.uniform(0.5, 2, 8).astype(np.float32), rng.uniform(-1, 1, 8).astype(np.float32)
        v = {"params": {"scale": g, "bias": b}}
        y = np.asarray(linen.LayerNorm(epsilon=1e-5, use_fast_variance=fast).apply(v, x))
        flat = x.reshape(-1, 8)
        exact, mag, n = reference("layernorm", flat, g, b, {"eps": 1e-5})
        assert judge_norm(y.reshape(-1, 8), exact, mag, n, "float32").passed, (offset, fast)
        y = np.asarray(linen.GroupNorm(num_groups=2, epsilon=1e-5, use_fast_variance=fast).apply(v, x))
        exact, mag, n = reference("groupnorm", x.transpose(0, 3, 1, 2), g, b, {"eps": 1e-5, "groups": 2})
        assert judge_norm(y.transpose(0, 3, 1, 2), exact, mag, n, "float32").passed, (offset, fast)

"""check_models with Flax linen models, as (module, variables): against torch twins converted by a right and a wrong
converter, against themselves, and the adapter's description of each layer against what flax computes."""

from __future__ import annotations

import numpy as np
import pytest

from equivcheck.errors import EquivcheckError

SHAPE = (2, 12, 10, 3)  # N, H, W, C: flax is channels last; a non-square map so H and W cannot be confused


@pytest.fixture(scope="module")
def nn():
    return pytest.importorskip("flax.linen", reason="flax not installed: pip install 'equivcheck[flax]'")


@pytest.fixture(scope="module")
def flax_cnn(nn, jax):
    """Conv → relu → max_pool → reshape → Dense → relu → Dense, random params."""

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))  # NHWC: the features in HWC order
            x = nn.relu(nn.Dense(8, name="fc1")(x))
            return nn.Dense(5, name="fc2")(x)

    module = SmallCNN()
    return module, module.init(jax.random.PRNGKey(0), np.zeros(SHAPE, np.float32))


def _to_torch(model, *, flatten: str = "right"):
    """The torch twin of SmallCNN with the flax weights (``flatten="wrong"``: fc1's kernel merely transposed)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 6 * 5, 8), nn.ReLU(), nn.Linear(8, 5))
    p = {name: {k: np.asarray(v) for k, v in layer.items()} for name, layer in model[1]["params"].items()}
    fc1 = p["fc1"]["kernel"]  # (H*W*C, 8), rows in HWC order
    if flatten == "right":
        fc1 = fc1.reshape(6, 5, 4, 8).transpose(3, 2, 0, 1).reshape(8, 120)  # rows to CHW, torch's flatten
    else:
        fc1 = fc1.T
    weights = [(0, p["conv"]["kernel"].transpose(3, 2, 0, 1), p["conv"]["bias"]), (4, fc1, p["fc1"]["bias"]),
               (6, p["fc2"]["kernel"].T, p["fc2"]["bias"])]
    with torch.no_grad():
        for i, w, b in weights:
            net[i].weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            net[i].bias.copy_(torch.from_numpy(b.copy()))
    return net.eval()


def test_flax_to_torch_right_converter_passes(flax_cnn, torch):
    import equivcheck as ec

    result = ec.check_models(flax_cnn, _to_torch(flax_cnn), input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted) for r in result.layers] == [("conv", "0"), ("fc1", "4"), ("fc2", "6")]
    assert not result.unpaired
    assert result.layers[1].boundary == "flattened HWC → CHW"
    back = ec.check_models(_to_torch(flax_cnn), flax_cnn, input_shape=(2, 3, 12, 10))
    assert back.verdict == "pass", back.render()


def test_flax_to_torch_wrong_flatten_order_fails_at_first_dense(flax_cnn, torch):
    import equivcheck as ec

    result = ec.check_models(flax_cnn, _to_torch(flax_cnn, flatten="wrong"), input_shape=SHAPE)
    assert result.verdict == "fail"
    assert result.first_divergence.source == "fc1"
    assert "wrong flatten order" in result.first_divergence.diagnosis
    assert [r.verdict for r in result.layers] == ["pass", "fail", "pass"]


def test_flax_against_itself_passes(flax_cnn):
    import equivcheck as ec

    result = ec.check_models(flax_cnn, flax_cnn, input_shape=SHAPE)
    assert result.verdict == "pass", result.render()
    assert len(result.layers) == 3
    with pytest.raises(EquivcheckError, match=r"the source Flax model .* computes in float32: dtypes='float16' needs "
                                               r"params in float16"):
        ec.check_models(flax_cnn, flax_cnn, input_shape=SHAPE, dtypes=("float16",))


def test_a_bare_module_is_one_line(flax_cnn):
    import equivcheck as ec

    with pytest.raises(EquivcheckError, match=r"source=SmallCNN is not a Flax linen model: expected a "
                                               r"\(module, variables\) tuple") as info:
        ec.check_models(flax_cnn[0], flax_cnn, input_shape=SHAPE)
    assert "\n" not in str(info.value)
    with pytest.raises(EquivcheckError, match=r"converted=\(SmallCNN, list\) is not a Flax linen model"):
        ec.check_models(flax_cnn, (flax_cnn[0], []), input_shape=SHAPE)


# -- each layer's description, replayed by the numpy reference, against flax itself ------------------
LAYERS = [  # (class, keyword arguments, input shape)
    ("Conv", dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="SAME"), (2, 7, 6, 3)),  # uneven pads
    ("Conv", dict(features=6, kernel_size=(3, 2), kernel_dilation=(2, 1), padding=((1, 2), (0, 1))), (2, 7, 6, 3)),
    ("Conv", dict(features=6, kernel_size=(3, 3), feature_group_count=3, padding="VALID"), (2, 7, 6, 3)),
    ("Conv", dict(features=3, kernel_size=(3,), feature_group_count=3, use_bias=False), (2, 9, 3)),  # depthwise
    ("ConvTranspose", dict(features=2, kernel_size=(4, 4), strides=(2, 2), padding="SAME"), (2, 5, 4, 3)),
    ("ConvTranspose", dict(features=2, kernel_size=(3, 3), strides=(2, 2), padding="VALID"), (2, 5, 4, 3)),
    ("ConvTranspose", dict(features=2, kernel_size=(2, 2), strides=(3, 3), padding="VALID"), (2, 5, 4, 3)),  # k < s
    ("ConvTranspose", dict(features=2, kernel_size=(3, 3), strides=(2, 2), padding=((1, 2), (1, 2))), (2, 5, 4, 3)),
    ("ConvTranspose", dict(features=2, kernel_size=(4, 4), strides=(2, 2), padding="SAME", transpose_kernel=True),
     (2, 5, 4, 3)),
    ("Dense", dict(features=5), (2, 7)),
]


@pytest.mark.parametrize(("cls", "kwargs", "shape"), LAYERS, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(LAYERS)])
def test_layer_description_reproduces_flax(nn, jax, cls, kwargs, shape):
    """The kind, kernel layout, padding, output padding and op the adapter reports compute what flax computes."""
    from equivcheck import backends
    from equivcheck.modelcheck.layers import spec_of
    from equivcheck.modelcheck.sides import adapter_for

    module = getattr(nn, cls)(**kwargs)
    variables = module.init(jax.random.PRNGKey(3), np.zeros(shape, np.float32))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y, (rec,) = adapter_for((module, variables), "source").run(x)
    if cls == "ConvTranspose":
        assert rec.config["op"] == ("correlate" if kwargs.get("transpose_kernel") else "convolve")
    spec = spec_of(rec)
    layer = backends.get("numpy").build(spec, "float32")
    layer.set_weights(rec.kernel, rec.bias)
    np.testing.assert_allclose(np.asarray(layer(x)), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rec.y, y)


def test_conv_transpose_against_torch_needs_the_flip(nn, jax, torch):
    """torch ConvTranspose2d → flax ConvTranspose: the kernel flipped and (I, O) kept is right; unflipped fails."""
    import equivcheck as ec

    up = torch.nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1).eval()
    module = nn.ConvTranspose(2, (4, 4), strides=(2, 2), padding="SAME")
    w, b = up.weight.detach().numpy(), up.bias.detach().numpy()  # (I, O, kh, kw)
    for flip, verdict in ((True, "pass"), (False, "fail")):
        k = w[:, :, ::-1, ::-1] if flip else w
        variables = {"params": {"kernel": np.ascontiguousarray(k.transpose(2, 3, 0, 1)), "bias": b.copy()}}
        result = ec.check_models(up, (module, variables), input_shape=(2, 3, 5, 4))
        assert result.verdict == verdict, result.render()
        assert len(result.layers) == 1 and result.layers[0].verdict == verdict
        if not flip:
            assert "missing flip" in result.layers[0].diagnosis, result.layers[0].diagnosis


def test_flax_unsupported_padding_is_one_line(nn, jax):
    from equivcheck.modelcheck.sides import adapter_for

    module = nn.Conv(2, (3, 3), padding="CIRCULAR")
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 5, 5, 3), np.float32))
    with pytest.raises(EquivcheckError, match=r"source layer 'Conv' \(Conv\) has padding='CIRCULAR': expected"):
        adapter_for((module, variables), "source").run(np.zeros((1, 5, 5, 3), np.float32))

"""PyTorch conventions, pinned on the real framework (and the torch preset checked against them)."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends

from ._support import random_weights, reference


def _run(torch, module, kernel, bias, x):
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(bias))
        return module(torch.from_numpy(x)).numpy()


def test_flatten_linear_reads_chw_with_weight_out_in(torch):
    spec = ec.spec("torch:dense", channels=3, spatial=(2, 4), units=5)
    layer = torch.nn.Linear(spec.in_features, spec.units)
    assert tuple(layer.weight.shape) == spec.kernel_shape == (5, 24), "fact: nn.Linear weight is (out, in)"
    kernel, bias, x = random_weights(spec)
    flat = torch.nn.Flatten()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(flat, x.reshape(2, -1), err_msg="fact: nn.Flatten on NCHW flattens in C, H, W order")
    assert spec.flatten == "CHW" and spec.data_format == "channels_first", "torch preset: NCHW map, CHW flatten"
    y = _run(torch, layer, kernel, bias, flat)
    np.testing.assert_allclose(y, reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_weight_is_oihw_and_correlates(torch, rank):
    spatial, ks = (5, 6, 4)[:rank], (2, 3, 2)[:rank]
    spec = ec.spec("torch:conv", channels=3, spatial=spatial, kernel_size=ks, units=4, stride=2, padding=1)
    layer = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[rank - 1](3, 4, ks, stride=2, padding=1)
    assert tuple(layer.weight.shape) == spec.kernel_shape, f"fact: Conv{rank}d weight is (out, in, *k) = {spec.kernel_layout}"
    kernel, bias, x = random_weights(spec)
    np.testing.assert_allclose(
        _run(torch, layer, kernel, bias, x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
        err_msg=f"fact: torch Conv{rank}d computes cross-correlation with an OIHW kernel",
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_transpose_weight_is_iohw(torch, rank):
    spatial, ks = (4, 3, 3)[:rank], (3, 2, 2)[:rank]
    spec = ec.spec("torch:conv_transpose", channels=4, spatial=spatial, kernel_size=ks, units=6, stride=2,
                   padding=1, output_padding=1, groups=2)
    cls = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)[rank - 1]
    layer = cls(4, 6, ks, stride=2, padding=1, output_padding=1, groups=2)
    assert tuple(layer.weight.shape) == spec.kernel_shape, "fact: ConvTranspose weight is (in, out/groups, *k)"
    kernel, bias, x = random_weights(spec)
    np.testing.assert_allclose(
        _run(torch, layer, kernel, bias, x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
        err_msg=f"fact: torch ConvTranspose{rank}d scatters through an IOHW kernel without flipping it",
    )


def test_depthwise_is_groups_equal_channels(torch):
    spec = ec.spec("torch:depthwise", channels=3, spatial=(5, 5), kernel_size=(3, 2), multiplier=2)
    layer = torch.nn.Conv2d(3, 6, (3, 2), groups=3)
    assert tuple(layer.weight.shape) == spec.kernel_shape == (6, 1, 3, 2), "fact: depthwise weight is (C*M, 1, kh, kw)"
    kernel, bias, x = random_weights(spec)
    np.testing.assert_allclose(
        _run(torch, layer, kernel, bias, x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
        err_msg="fact: output channel c*M + m of a depthwise conv reads input channel c",
    )


def test_same_padding_refuses_stride_so_the_backend_pads_explicitly(torch):
    with pytest.raises(ValueError, match="strided"):
        torch.nn.Conv2d(2, 2, 3, stride=2, padding="same")
    spec = ec.spec("torch:conv", channels=2, spatial=(6, 5), kernel_size=(3, 2), units=2, stride=2, padding="same")
    layer = backends.get("torch").build(spec)
    kernel, bias, x = random_weights(spec)
    layer.set_weights(kernel, bias)
    np.testing.assert_allclose(layer(x), reference(spec, kernel, bias, x), rtol=1e-5, atol=1e-5,
                               err_msg="torch backend: a strided 'same' conv pads as TensorFlow does (extra after)")

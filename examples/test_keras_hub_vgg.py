"""keras-hub's timm → Keras VGG conversion (``keras_hub/src/utils/timm/convert_vgg.py``), checked with equivcheck.

The checkpoint is a timm-layout VGG11 built here with random weights and narrow widths
(``features.N``, ``pre_logits.fc1/fc2`` as 7×7 and 1×1 convolutions, ``head.fc``), written as
``model.safetensors`` with a timm ``config.json``; keras-hub's own ``TimmPresetLoader`` (what
``from_preset("hf://timm/vgg11...")`` runs) loads it. The widths are keyword overrides of
``load_backbone``: ``from_preset`` itself always builds the full 64…512-filter VGG.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.errors import EquivcheckError

keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is not installed (.ci/examples-requirements.txt)")
torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")

import keras  # noqa: E402  (after the skips: keras-hub brings it)
from keras_hub.src.models.vgg.vgg_backbone import VGGBackbone  # noqa: E402
from keras_hub.src.models.vgg.vgg_image_classifier import VGGImageClassifier  # noqa: E402
from keras_hub.src.utils.timm import convert_vgg  # noqa: E402
from keras_hub.src.utils.timm.preset_loader import TimmPresetLoader  # noqa: E402
from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader  # noqa: E402

WIDTHS = [8, 16, 32, 32, 32]
REPEATS = convert_vgg.REPEATS_BY_SIZE["vgg11"]
HIDDEN = 64
INPUT = (2, 3, 224, 224)  # the 7×7 fc1 needs the 7×7 map of a 224×224 image


class TimmVGG(torch.nn.Module):
    """timm's VGG in layout and function (``timm.models.vgg``: features, ConvMlp pre_logits, ClassifierHead)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c = 3
        for width, repeats in zip(WIDTHS, REPEATS):
            for _ in range(repeats):
                layers += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.ReLU()]
                c = width
            layers.append(torch.nn.MaxPool2d(2, 2))
        self.features = torch.nn.Sequential(*layers)
        self.pre_logits = torch.nn.Module()
        self.pre_logits.fc1 = torch.nn.Conv2d(c, HIDDEN, 7)
        self.pre_logits.fc2 = torch.nn.Conv2d(HIDDEN, HIDDEN, 1)
        self.head = torch.nn.Module()
        self.head.fc = torch.nn.Linear(HIDDEN, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.features(x)
        x = torch.relu(self.pre_logits.fc2(torch.relu(self.pre_logits.fc1(x))))
        return self.head.fc(x.mean((2, 3)))


def write_timm_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    """A timm-format preset folder: ``config.json`` and ``model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": "vgg11", "num_classes": model.head.fc.out_features, "num_features": HIDDEN}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_with_keras_hub(folder: Path, pooling: str = "avg") -> keras.Model:
    """What ``ImageClassifier.from_preset(folder)`` does, at our widths."""
    config = json.loads((folder / "config.json").read_text())
    loader = TimmPresetLoader(str(folder), config)
    backbone = loader.load_backbone(VGGBackbone, True, stackwise_num_filters=WIDTHS, image_shape=(224, 224, 3))
    return loader.load_task(VGGImageClassifier, True, True, backbone=backbone, preprocessor=None,
                            pooling=pooling, pooling_hidden_dim=HIDDEN)


def flatten(model: keras.Model) -> keras.Model:
    """The classifier (backbone and head are nested models) as one functional model with the same weights.

    equivcheck traces flat models only; every keras-hub VGG layer takes one input, so the chain
    of leaf layers is the model.
    """
    def leaves(m: keras.Model):  # type: ignore[no-untyped-def]
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                yield from leaves(layer)
            elif not isinstance(layer, keras.layers.InputLayer):
                yield layer

    inputs = keras.Input(batch_shape=model.input_shape)
    x = inputs
    for layer in leaves(model):
        clone = layer.__class__.from_config(layer.get_config())
        x = clone(x)
        clone.set_weights(layer.get_weights())
    return keras.Model(inputs, x, name=model.name)


class ArrayLoader(SafetensorLoader):
    """keras-hub's loader (``port_weight``: hook, then assign) reading from arrays instead of a file."""

    def __init__(self, tensors: dict[str, np.ndarray | None]) -> None:
        contextlib.ExitStack.__init__(self)  # SafetensorLoader's own __init__ wants a preset folder
        self.tensors = tensors

    def get_tensor(self, hf_weight_key: str) -> np.ndarray:
        return self.tensors[hf_weight_key]


def ported(layer: keras.layers.Layer, tensors: dict[str, np.ndarray | None],
           port: Callable[[Any, SafetensorLoader], None]) -> tuple[np.ndarray, np.ndarray | None]:
    """Run one of keras-hub's per-layer ports into ``layer`` (a model with just that layer); its weights after."""
    port(types.SimpleNamespace(get_layer=lambda name: layer), ArrayLoader(tensors))
    return np.asarray(layer.kernel), None if layer.bias is None else np.asarray(layer.bias)


def conv_port(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """keras-hub's ``convert_conv2d`` (every backbone conv, ``fc1``, ``fc2``): torch OIHW → Keras HWIO."""
    out, _, kh, kw = kernel.shape
    layer = keras.layers.Conv2D(out, (kh, kw), padding="same")
    layer.build((None, None, None, kernel.shape[1]))
    return ported(layer, {"src.weight": kernel, "src.bias": bias},
                  lambda model, loader: convert_vgg.convert_conv2d(model, loader, "conv", "src"))


def head_port(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """keras-hub's ``convert_head`` port of ``head.fc`` into ``predictions``: ``np.transpose(np.squeeze(x))``."""
    layer = keras.layers.Dense(kernel.shape[0])
    layer.build((None, kernel.shape[1]))
    # pooling="flatten": convert_head then ports only head.fc (the fc1/fc2 ports are the conv port above).
    return ported(layer, {"head.fc.weight": kernel, "head.fc.bias": bias},
                  lambda model, loader: convert_vgg.convert_head(types.SimpleNamespace(pooling="flatten", head=model),
                                                                 loader, {"architecture": "vgg11"}))


# ---- per layer: keras-hub's port functions over generated shapes, on real torch and Keras layers


def test_conv_port_per_layer(equivcheck):
    equivcheck.check_converter(conv_port, source="torch:conv", target="keras:conv", channels=(1, 8), units=(1, 8),
                               spatial=(6, 7), kernel_size=((1, 3), (1, 3)), padding="same", max_examples=10)


def test_head_port_per_layer(equivcheck):
    equivcheck.check_converter(head_port, source="torch:dense", target="keras:dense", channels=(2, 32), units=(2, 16),
                               max_examples=10)


@pytest.mark.xfail(strict=True, raises=ec.ConversionCheckFailed,
                   reason="keras-hub 0.32 convert_vgg.convert_head: np.squeeze drops the 1-class axis of head.fc.weight "
                          "(1, in) and the (in,) result cannot be assigned to the (in, 1) Dense kernel")
def test_head_port_one_class(equivcheck):
    equivcheck.check_converter(head_port, source="torch:dense", target="keras:dense", channels=16, units=1)


# ---- whole model: a timm checkpoint loaded by keras-hub's TimmPresetLoader, layer by layer


def convert_checkpoint(tmp_path: Path, pooling: str = "avg"):  # type: ignore[no-untyped-def]
    def convert(model: torch.nn.Module) -> keras.Model:
        return flatten(load_with_keras_hub(write_timm_checkpoint(model, tmp_path / "timm-vgg11"), pooling))
    return convert


def test_timm_checkpoint_layer_by_layer(equivcheck, tmp_path):
    torch.manual_seed(0)
    result = equivcheck.check_model_converter(convert_checkpoint(tmp_path), source=TimmVGG, input_shape=INPUT)
    assert result.verdict == "pass", result.render()
    assert len(result.layers) == sum(REPEATS) + 3 and not result.unpaired  # 8 convs, fc1, fc2, head.fc


@pytest.mark.xfail(strict=True, raises=EquivcheckError,
                   reason="keras-hub 0.32 convert_vgg.convert_head: np.squeeze drops the 1-class axis of head.fc.weight; "
                          "a 1-class timm VGG checkpoint cannot be loaded")
def test_timm_checkpoint_one_class(equivcheck, tmp_path):
    torch.manual_seed(0)
    equivcheck.check_model_converter(convert_checkpoint(tmp_path), source=lambda: TimmVGG(num_classes=1),
                                     input_shape=INPUT)


def test_flatten_pooling_leaves_fc1_fc2_unported(tmp_path):
    """``pooling="flatten"`` (a ``from_preset`` keyword) skips the pre_logits ports: fc1/fc2 keep their random init.

    equivcheck names fc1 as the first wrong layer and says its kernel is not a rearrangement of timm's.
    """
    torch.manual_seed(0)
    source = TimmVGG().eval()
    converted = convert_checkpoint(tmp_path, pooling="flatten")(source)
    result = ec.check_models(source, converted, input_shape=INPUT, mutants=False)
    assert result.verdict == "fail"
    first = result.first_divergence
    assert (first.source, first.converted) == ("pre_logits.fc1", "fc1"), result.render()
    assert "different weights" in first.diagnosis, result.render()
    assert not result.end_to_end["float32"]["passed"]

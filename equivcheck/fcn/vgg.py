"""A VGG16-style torch model (random weights, nothing downloaded) and its state-dict round trip.

The layout follows torchvision's VGG: ``features`` (3×3 convs with padding 1, ReLU, 2×2
max pools), ``avgpool`` (``AdaptiveAvgPool2d`` to the classifier's map), ``torch.flatten``
in ``forward``, then ``classifier`` (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear).
State-dict keys are torchvision's, so a torchvision VGG16 state dict loads here too.

A state dict alone has no architecture: :func:`from_state_dict` rebuilds this family from
the weight shapes (3×3 convs with padding 1, a pool after each block and at the end), as the original (``classifier.0.weight`` of rank 2) or as its
convolutionalized form (rank 4). The training input size is the classifier's map size
× 2^(number of pools), 224 for VGG16.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from equivcheck.errors import FileFormatError

__all__ = ["VGG", "VGG16", "from_state_dict", "vgg16"]

VGG16: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _features(cfg: Sequence[int | str], in_channels: int, padding: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=padding), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-style classifier. ``input_shape`` records the training size (C, H, W)."""

    def __init__(self, cfg: Sequence[int | str] = VGG16, *, hidden: int = 4096, num_classes: int = 1000,
                 map_size: int = 7, in_channels: int = 3, padding: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        self.cfg = tuple(cfg)
        self.features = _features(cfg, in_channels, padding)
        self.avgpool = nn.AdaptiveAvgPool2d((map_size, map_size))
        channels = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Sequential(
            nn.Linear(int(channels) * map_size * map_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        pools = sum(v == "M" for v in cfg)
        size = map_size * 2**pools
        if padding == 0:  # each 3×3 valid conv trims 2 pixels: find the smallest input giving map_size
            size = valid_input_size(cfg, map_size)
        self.input_shape = (in_channels, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def valid_input_size(cfg: Sequence[int | str], map_size: int) -> int:
    """The input size an unpadded VGG body turns into a ``map_size`` map."""
    size = map_size
    for v in reversed(cfg):
        size = size * 2 if v == "M" else size + 2
    return size


def vgg16(num_classes: int = 1000, *, seed: int | None = 0) -> VGG:
    """VGG16 with random weights (seeded), in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    return VGG(VGG16, num_classes=num_classes).eval()


_CONV = re.compile(r"^features\.(\d+)\.weight$")


def from_state_dict(state: Mapping[str, Any]) -> nn.Module:
    """Rebuild a VGG (or its convolutionalized form) from a state dict of arrays or tensors."""
    tensors = {k: torch.as_tensor(v) for k, v in state.items()}
    convs = sorted((int(m.group(1)), t) for k, t in tensors.items() if (m := _CONV.match(k)))
    first = tensors.get("classifier.0.weight")
    if not convs or first is None or "classifier.6.weight" not in tensors:
        raise FileFormatError(
            "this state dict is not a VGG-style model (features.N.weight, classifier.0/3/6.weight): a state dict has no "
            "architecture, so equivcheck handles torch files only for its own VGG16-style model; for other models call "
            "equivcheck.convolutionalize(model, input_shape=...) in Python"
        )
    cfg: list[int | str] = []
    expected = 0
    for index, weight in convs:
        if index == expected + 1:
            cfg.append("M")
        elif index != expected:
            raise FileFormatError(f"features.{index}.weight is not where a VGG conv sits (expected index {expected} or {expected + 1})")
        cfg.append(int(weight.shape[0]))
        expected = index + 2
    cfg.append("M")  # pools hold no weights; VGG's features always end with one
    channels = int(convs[-1][1].shape[0])
    hidden = int(first.shape[0])
    num_classes = int(tensors["classifier.6.weight"].shape[0])
    if first.ndim == 4:
        map_size = int(first.shape[-1])
    else:
        area = int(first.shape[1]) // channels
        map_size = math.isqrt(area)
        if map_size * map_size * channels != int(first.shape[1]):
            raise FileFormatError(f"classifier.0.weight shape={tuple(first.shape)} does not read a square map of {channels} channels")
    model = VGG(cfg, hidden=hidden, num_classes=num_classes, map_size=map_size, in_channels=int(convs[0][1].shape[1]),
                padding=1)
    target = model
    if first.ndim == 4:
        from equivcheck.fcn.torch import convolutionalize

        target = convolutionalize(model)
    try:
        missing, unexpected = target.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise FileFormatError(f"state dict does not fit the VGG rebuilt from its shapes: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise FileFormatError(f"state dict does not fit the VGG rebuilt from its shapes: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return target.eval()


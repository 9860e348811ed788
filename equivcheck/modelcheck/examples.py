"""A small VGG-style classifier and user-style converters to Keras (right and wrong): the demo's and tests' whole models."""

from __future__ import annotations

import numpy as np

SHAPE = (2, 3, 12, 10)  # N, C, H, W: a non-square map, so H and W cannot be confused silently


def torch_vgg(seed: int = 0):
    """conv, relu, maxpool, conv, relu, maxpool, flatten (in forward), linear, relu, dropout, linear."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class SmallVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                          nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(nn.Linear(6 * 3 * 2, 8), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(8, 5))

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    return SmallVGG()


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def to_keras(model, *, flatten: str = "right"):
    """A torch SmallVGG as a channels-last Keras model.

    ``flatten``: ``"right"`` (plain Flatten, Dense kernel rows permuted to HWC), ``"wrong"`` (plain
    Flatten, kernel merely transposed), ``"graph"`` (a Permute to CHW in the graph, kernel
    transposed: right, as nobuco does), ``"graph-wrong"`` (a Permute to CWH, kernel transposed).
    """
    import keras

    L = keras.layers
    convs = [m for m in model.features if type(m).__name__ == "Conv2d"]
    fc1, fc2 = model.classifier[0], model.classifier[3]
    inp = keras.Input((12, 10, 3))
    x = inp
    for i, conv in enumerate(convs):
        x = L.Conv2D(conv.out_channels, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = L.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    if flatten == "graph":
        x = L.Permute((3, 1, 2), name="to_chw")(x)
    elif flatten == "graph-wrong":
        x = L.Permute((3, 2, 1), name="to_cwh")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(8, activation="relu", name="fc1")(x)
    x = L.Dense(5, name="fc2")(x)
    out = keras.Model(inp, x, name="small_vgg_keras")
    for i, conv in enumerate(convs):
        out.get_layer(f"conv{i + 1}").set_weights([_np(conv.weight).transpose(2, 3, 1, 0), _np(conv.bias)])
    w = _np(fc1.weight)  # (8, C*H*W) in CHW order
    if flatten == "right":
        k = w.reshape(8, 6, 3, 2).transpose(2, 3, 1, 0).reshape(36, 8)
    else:
        k = w.T
    out.get_layer("fc1").set_weights([k, _np(fc1.bias)])
    out.get_layer("fc2").set_weights([_np(fc2.weight).T, _np(fc2.bias)])
    return out


def keras_vgg(seed: int = 0):
    """The Keras twin of torch_vgg (channels last), random weights."""
    import keras

    L = keras.layers
    inp = keras.Input((12, 10, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(8, activation="relu", name="fc1")(x)
    x = L.Dense(5, name="fc2")(x)
    model = keras.Model(inp, x, name="small_vgg")
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.standard_normal(w.shape) * (0.5 if w.ndim > 1 else 0.1)).astype(np.float32)
                       for w in model.get_weights()])
    return model


def keras_to_torch(model, *, flatten: str = "right"):
    """A Keras small VGG as the torch SmallVGG (``flatten="wrong"``: the Dense kernel merely transposed)."""
    import torch

    net = torch_vgg()
    convs = [m for m in net.features if type(m).__name__ == "Conv2d"]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            k, b = model.get_layer(f"conv{i + 1}").get_weights()
            conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(b))
        k, b = model.get_layer("fc1").get_weights()  # (H*W*C, 8) in HWC order
        if flatten == "right":
            w = k.reshape(3, 2, 6, 8).transpose(3, 2, 0, 1).reshape(8, 36)
        else:
            w = k.T
        net.classifier[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        net.classifier[0].bias.copy_(torch.from_numpy(b))
        k, b = model.get_layer("fc2").get_weights()
        net.classifier[3].weight.copy_(torch.from_numpy(k.T.copy()))
        net.classifier[3].bias.copy_(torch.from_numpy(b))
    return net

"""Whole-model check cost: checking a converted VGG16 layer by layer against one forward pass of both models.

A torch VGG16 (random weights, 224×224) is converted to Keras (channels last) by a right
converter; ``check_models`` (capture, pairing, replay of every converted layer alone, bounds,
the mutant check) is timed against a plain forward pass of the source and of the converted
model on the same batch, side by side in this run: each check between two forward passes, the ratio the
median over the runs (the machine may be shared; a ratio of neighbours in time is steadier than two minima).
Target: ≤ 3×.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def to_keras(model, size: int):
    """A right torch VGG → Keras converter (the one a user would write, with equivcheck's planner for fc6)."""
    import keras
    from torch import nn

    from equivcheck.planning import plan
    from equivcheck.presets import spec

    L = keras.layers
    layers, weights = [keras.Input((size, size, model.features[0].in_channels))], []
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            layers.append(L.Conv2D(m.out_channels, m.kernel_size, padding="same"))
            weights.append((len(layers) - 1, [m.weight.detach().numpy().transpose(2, 3, 1, 0), m.bias.detach().numpy()]))
        elif isinstance(m, nn.ReLU):
            layers.append(L.ReLU())
        elif isinstance(m, nn.MaxPool2d):
            layers.append(L.MaxPooling2D(2))
    layers.append(L.Flatten())
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    channels = model.features[-3].out_channels
    side = round((linears[0].in_features // channels) ** 0.5)
    for i, m in enumerate(linears):
        layers.append(L.Dense(m.out_features, activation="relu" if i < len(linears) - 1 else None))
        w = m.weight.detach().numpy()
        if i == 0:
            src = spec("torch:dense", channels=channels, spatial=(side, side), units=m.out_features)
            dst = spec("keras:dense", channels=channels, spatial=(side, side), units=m.out_features)
            k = plan(src, dst).apply(w)
        else:
            k = w.T
        weights.append((len(layers) - 1, [k, m.bias.detach().numpy()]))
    net = keras.Sequential(layers)
    for index, ws in weights:
        net.layers[index - 1].set_weights(ws)
    return net


def rows(quick: bool = False, repeat: int = 5, batch: int = 2) -> list[tuple[str, float, float, float, str, list]]:
    import numpy as np
    import torch

    from equivcheck.fcn.vgg import VGG, vgg16
    from equivcheck.modelcheck import check_models

    torch.set_grad_enabled(False)
    if quick:
        model, size = VGG([16, "M", 32, "M", 32, "M"], hidden=64, num_classes=10, map_size=4).eval(), 32
    else:
        model, size = vgg16(), 224
    converted = to_keras(model, size)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    xk = np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    def forward() -> None:
        model(torch.from_numpy(x))
        converted(xk, training=False)

    def check() -> str:
        return check_models(model, converted, input_shape=(batch, 3, size, size)).verdict

    forward()
    verdict = check()  # warm-up: graph building, first-call kernels
    runs = []  # (forward of both, check): each check bracketed by two forward passes, their mean its baseline
    after = _time(forward)
    for _ in range(max(1, repeat)):
        before, t_check, after = after, _time(check), _time(forward)
        runs.append(((before + after) / 2, t_check))
    label = f"{'small VGG 32×32' if quick else 'VGG16 224×224'}, torch → Keras, batch {batch}"
    ratio = statistics.median(c / f for f, c in runs)
    return [(label, statistics.median(f for f, _ in runs), statistics.median(c for _, c in runs), ratio, verdict, runs)]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def render(table, markdown: bool = False) -> str:
    """The median of the runs; each run's forward and check below (markdown) or after (text)."""
    def each(runs) -> str:
        return ", ".join(f"{f:.2f} / {c:.2f}" for f, c in runs)

    if markdown:
        return "\n".join(["| model | forward of both (s) | layer-by-layer check (s) | ratio × | verdict |",
                          "|---|---:|---:|---:|---|"] + [f"| {m} | {f:.3f} | {c:.3f} | {r:.2f} | {v} |"
                                                      for m, f, c, r, v, _ in table] +
                         ["", *(f"Median of {len(runs)} runs, each check between two forward passes (their mean its "
                                f"baseline); forward / check (s) of each: {each(runs)}." for *_, runs in table)])
    return "\n".join(f"{m}: forward of both {f:.3f} s, check {c:.3f} s, {r:.2f}× ({v}); median of {len(runs)} runs, "
                     f"forward / check (s): {each(runs)}" for m, f, c, r, v, runs in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.quick, args.repeat), args.markdown))


if __name__ == "__main__":
    main()

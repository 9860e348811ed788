"""The framework-neutral head: exact forward, the propagated bound, mutants (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.fcn.head import ACTIVATIONS, Activation, Dense, Head, HeadError, Propagated, check_activation
from equivcheck.fcn.sliding import mutant_matrices

RNG = np.random.default_rng(0)


def dense(preset, channels, spatial, units, rng=RNG):
    s = ec.spec(f"{preset}:dense", channels=channels, spatial=spatial, units=units)
    kernel = (rng.standard_normal(s.kernel_shape) / np.sqrt(s.in_features)).astype(np.float32)
    return Dense(f"{preset}-fc", s, kernel, rng.standard_normal(units).astype(np.float32))


def float32_head(head: Head, maps: np.ndarray, *, swap: bool = False) -> np.ndarray:
    """The head computed the plain float32 way, reading the framework's own kernels."""
    x = maps.astype(np.float32)
    for step in head.steps:
        if isinstance(step, Dense):
            s = step.spec
            # flatten the canonical map in the framework's order, then multiply by its stored kernel
            letters = s.map_letters
            if x.ndim > 2:
                x = x.transpose(0, *(1 + letters.index(a) for a in s.flatten)).reshape(x.shape[0], -1)
            w = step.kernel if s.kernel_layout == "IO" else step.kernel.T
            x = x @ w + step.bias
        elif step.kind == "relu":
            x = np.maximum(x, 0)
        elif step.kind == "softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            x = e / e.sum(axis=1, keepdims=True)
    return x


@pytest.mark.parametrize("preset", ["keras", "keras_cf", "torch", "tflite", "theano"])
def test_exact_head_reads_each_presets_flatten_order(preset):
    head = Head((3, 4, 5), [dense(preset, 3, (4, 5), 6), Activation("a", "relu"), dense(preset, 6, (), 2)])
    maps = RNG.standard_normal((7, 3, 4, 5))
    exact = head.run(maps)
    assert head.judge(float32_head(head, maps), exact).passed


def test_bound_rejects_a_wrong_flatten_order_and_accepts_rounding():
    head = Head((3, 4, 5), [dense("keras", 3, (4, 5), 6), Activation("a", "relu"), dense("keras", 6, (), 4),
                            Activation("s", "softmax")])
    maps = RNG.standard_normal((5, 3, 4, 5))
    exact = head.run(maps)
    assert head.judge(float32_head(head, maps), exact).passed
    wrong = maps.transpose(0, 1, 3, 2).reshape(maps.shape)  # same numbers, other order
    assert not head.judge(float32_head(head, wrong), exact).passed


def test_nan_never_passes():
    head = Head((2, 3, 3), [dense("torch", 2, (3, 3), 4)])
    maps = RNG.standard_normal((2, 2, 3, 3))
    exact = head.run(maps)
    y = float32_head(head, maps)
    y[0, 0] = np.nan
    assert not head.judge(y, exact).passed


def test_relu_error_vanishes_where_both_values_are_negative():
    x = Propagated(np.array([[-1.0, -1e-9, 2.0]]), np.full((1, 3), 1e-6))
    out = ACTIVATIONS["relu"](x, "float32")
    assert out.d.tolist() == [[0.0, 1e-6, 1e-6]]


def test_softmax_bound_holds_for_perturbed_logits():
    rng = np.random.default_rng(3)
    for _ in range(50):
        z = rng.standard_normal((1, 30)) * rng.uniform(0.1, 20)
        d = np.abs(rng.standard_normal((1, 30))) * 1e-2
        out = ACTIVATIONS["softmax"](Propagated(z, d), "float64")
        moved = z + d * rng.choice([-1.0, 1.0], size=z.shape)
        e = np.exp(moved - moved.max())
        assert np.all(np.abs(e / e.sum() - out.v) <= out.d)


def test_unknown_activation_is_named():
    with pytest.raises(HeadError, match=r"activation='mish' of layer 'fc'.*expected one of") as info:
        check_activation("mish", "fc")
    assert "\n" not in str(info.value)


def test_head_refuses_a_map_of_another_shape():
    head = Head((2, 3, 3), [dense("torch", 2, (3, 3), 4)])
    with pytest.raises(HeadError, match=r"feature map shape=\(2, 4, 4\)"):
        head.run(np.zeros((1, 2, 4, 4)))


def test_mutants_are_wrong_and_distinct():
    head = Head((3, 4, 4), [dense("keras", 3, (4, 4), 5)])
    right = head.denses[0].matrix
    found = mutant_matrices(head)
    assert set(found) == {"flatten order", "spatial flip", "spatial axes swapped", "bias dropped"}
    for name, m in found.items():
        if name != "bias dropped":
            assert m.shape == right.shape and not np.array_equal(m, right), name

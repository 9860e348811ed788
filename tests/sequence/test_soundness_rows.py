"""The soundness benchmark's rows for recurrent and attention layers: drawn through the public API only."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "soundness.py"


@pytest.fixture
def soundness():
    spec = importlib.util.spec_from_file_location("soundness_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sequence_rows_have_no_false_alarm(soundness, monkeypatch):
    monkeypatch.setattr(soundness, "SEQUENCE_KINDS", {"lstm": {"input_size": 4, "units": 5}})
    rows = soundness.measure_sequence(1, ("torch",))
    assert [r[:3] for r in rows] == [["torch", "lstm", d] for d in soundness.DTYPES]
    assert all(alarms == 0 for *_, alarms, _inconclusive, _trials, _rate, _checker in rows)
    float32 = rows[0]
    assert float32[-2:] == [1.0, 1.0]  # the swap is caught by verify_pair and by check_converter
    assert "backend" in soundness.render([["native", *r] for r in rows])


def test_the_swapper_swaps_one_pair_of_distinct_weights(soundness):
    import numpy as np

    w = {"a": np.arange(6.0).reshape(2, 3), "b": np.zeros(4)}
    out = soundness.named_swapper(3)(w)
    assert np.array_equal(out["b"], w["b"]) and (out["a"] != w["a"]).sum() == 2
    assert sorted(out["a"].ravel()) == sorted(w["a"].ravel())


def test_the_swapper_passes_over_pairs_inside_a_key_bias(soundness):
    import numpy as np

    w = {"in_proj_bias": np.arange(6.0)}  # q: 0, 1; k: 2, 3; v: 4, 5
    pairs = {tuple(np.flatnonzero(soundness.named_swapper(seed)(w)["in_proj_bias"] != w["in_proj_bias"])) for seed in range(40)}
    assert (2, 3) not in pairs and len(pairs) > 5 and all(len(p) == 2 for p in pairs)
    assert list(soundness.key_bias("key/bias", 4)) == [0, 1, 2, 3] and not soundness.key_bias("value/bias", 4)


def test_the_swapper_never_picks_a_tensor_that_is_all_key_bias(soundness):
    """Keras's ``key/bias`` has no pair to swap: chosen, the converter would make no mistake at all."""
    import numpy as np

    w = {"attention/key/bias": np.arange(4.0), "attention/value/bias": np.arange(4.0)}
    for seed in range(20):
        out = soundness.named_swapper(seed)(w)
        assert np.array_equal(out["attention/key/bias"], w["attention/key/bias"])
        assert (out["attention/value/bias"] != w["attention/value/bias"]).sum() == 2


def test_a_key_bias_swap_leaves_torch_attention_unchanged():
    """Why the swapper passes over key-bias pairs: on the real layer, its output does not move (float32 rounding)."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        layer.in_proj_bias.normal_()
        x = torch.randn(3, 5, 8)
        before = layer(x, x, x, need_weights=False)[0]
        layer.in_proj_bias[[9, 14]] = layer.in_proj_bias[[14, 9]].clone()  # two entries of the key bias (8..15)
        after = layer(x, x, x, need_weights=False)[0]
        layer.in_proj_bias[[1, 14]] = layer.in_proj_bias[[14, 1]].clone()  # a query entry with a key entry: it moves
        moved = layer(x, x, x, need_weights=False)[0]
    assert np.allclose(before.numpy(), after.numpy(), atol=1e-5)
    assert not np.allclose(before.numpy(), moved.numpy(), atol=1e-3)


def test_the_swapper_passes_over_a_keras_gru_summed_bias_pair(soundness):
    """The input and recurrent biases of a Keras GRU's update and reset gates are only added: a swap between them is
    no mistake. The candidate gate's two biases differ (reset after the recurrent matmul): a swap there is one."""
    assert soundness.summed_biases("gru/bias", (2, 9), 1, 10) and soundness.summed_biases("bias", (2, 9), 14, 5)
    assert not soundness.summed_biases("bias", (2, 9), 6, 15)  # the candidate's: a real mistake
    assert not soundness.summed_biases("bias", (2, 9), 1, 11) and not soundness.summed_biases("kernel", (2, 9), 1, 10)
    import numpy as np

    w = {"bias": np.arange(18.0).reshape(2, 9)}
    for seed in range(40):
        changed = np.flatnonzero(soundness.named_swapper(seed)(w)["bias"] != w["bias"])
        assert len(changed) == 2 and not soundness.summed_biases("bias", (2, 9), *changed)


def test_a_summed_bias_swap_leaves_a_keras_gru_unchanged():
    """Why the swapper passes over those pairs: on the real Keras GRU, the output does not move (float32 rounding);
    the same swap in the candidate gate moves it."""
    import numpy as np

    import equivcheck as ec
    from equivcheck.sequence.backends import run

    gru = ec.spec("keras:gru", input_size=3, units=3)
    weights, x = ec.sequence.verify.draw(gru, seed=1, batch=3)
    before = run("keras", gru, weights, x, dtype="float32")

    def swapped(col):
        w = {k: v.copy() for k, v in weights.items()}
        w["bias"][:, col] = w["bias"][::-1, col]
        return np.abs(run("keras", gru, w, x, dtype="float32") - before).max()

    assert swapped(1) < 1e-6 and swapped(4) < 1e-6  # update and reset units
    assert swapped(7) > 1e-3  # the candidate's: reset applied between them

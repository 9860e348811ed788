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

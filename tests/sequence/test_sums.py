"""What a recurrent or attention layer's sums run in: the bound's factor on a sum, and the layer's own probe."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck.sequence import reference
from equivcheck.sequence import verify as verify_module

BF16 = reference.UNIT_ROUNDOFF["bfloat16"]


@given(st.integers(1, 15), st.integers(0, 2**32 - 1))
def test_a_short_sum_in_bfloat16_stays_within_its_factor(n, seed):
    """Below 16 terms the factor is the worst case γ_n: no order of rounding escapes it."""
    terms = np.random.default_rng(seed).standard_normal(n).astype(ml_dtypes.bfloat16)
    total = ml_dtypes.bfloat16(0)
    for t in terms:  # every partial sum rounded to bfloat16, one product at a time
        total = ml_dtypes.bfloat16(np.float32(total) + np.float32(t))
    exact = float(np.sum(terms.astype(np.float64)))
    assert abs(float(total) - exact) <= reference._growth(n, BF16) * float(np.sum(np.abs(terms.astype(np.float64))))


def test_the_factor_is_the_smaller_of_the_worst_case_and_the_probabilistic_one():
    assert reference._growth(4, BF16) == pytest.approx(4 * BF16 / (1 - 4 * BF16))  # 4 < 4·√4
    assert reference._growth(64, BF16) == pytest.approx(reference.GROWTH * 8 * BF16)  # 4·√64 = 32 < 64
    assert reference._growth(16, BF16) == pytest.approx(16 * BF16)  # 4·√16 = 16, just below γ_16


@pytest.fixture
def fresh_probe():
    probe = verify_module._sums_fit_float32  # the cached function itself, whatever a test patches in its place
    probe.cache_clear()
    yield
    probe.cache_clear()


@pytest.mark.parametrize(("error", "fits"), [(0.0, True), (2.0**-5, False)])
def test_the_layer_probe_tells_float32_sums_from_bfloat16_ones(monkeypatch, fresh_probe, error, fits):
    """A layer computing exactly fits float32 sums; one off by four bfloat16 ulps (what bfloat16 sums of
    a dozen terms can make) does not."""
    spec = ec.spec("keras:lstm", input_size=3, units=4)

    def run(backend, layer, weights, inputs, *, dtype, mask=None):
        y = reference.forward(layer, weights, inputs)
        return y * (1 + error)

    monkeypatch.setattr(verify_module, "run", run)
    assert verify_module._sums_fit_float32("keras", spec, "bfloat16") is fits


def test_float32_sums_are_taken_only_where_every_layer_fits_them(monkeypatch, fresh_probe):
    """The dense probe says bfloat16 sums: the pair is judged under float32 sums only when both layers fit them."""
    from equivcheck.backends import probe as probe_module

    class Facts:
        runs = decided = True
        accumulate = "bfloat16"

    monkeypatch.setattr(probe_module, "probe", lambda *a, **k: Facts())
    monkeypatch.setattr(probe_module, "layer_kinds", lambda name: {"dense": None})
    torch_lstm, keras_lstm = ec.spec("torch:lstm", input_size=3, units=4), ec.spec("keras:lstm", input_size=3, units=4)
    fits = {"torch": True, "keras": False}
    monkeypatch.setattr(verify_module, "_sums_fit_float32", lambda backend, spec, dtype: fits[backend])
    pair = (("torch", torch_lstm), ("keras", keras_lstm))
    assert verify_module._accumulation(pair, "bfloat16") == "bfloat16"
    fits["keras"] = True
    assert verify_module._accumulation(pair, "bfloat16") == "float32"
    assert verify_module._accumulation(pair, "float32") == "float32"  # nothing to refine


def test_draws_scale_the_inputs_only():
    spec = ec.spec("torch:mha", embed_dim=8, heads=2)
    w1, x1 = verify_module.draw(spec, seed=3)
    w2, x2 = verify_module.draw(spec, seed=3, scale=0.5)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert all(np.array_equal(a / 2, b) for a, b in zip(x1, x2))
    g1, y1 = verify_module.draw_grid(spec, seed=3)
    g2, y2 = verify_module.draw_grid(spec, seed=3, scale=0.5)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1) and all(np.array_equal(a / 2, b) for a, b in zip(y1, y2))


def test_a_mutant_the_normal_draws_miss_is_rejected_on_a_grid_draw(monkeypatch):
    """Under bfloat16 sums a GRU's reset placement hides in the bound on the normal draws but not on the grid draws,
    where the layers must agree too: the case is ``pass``, the mutant named rejected, not ``inconclusive``."""
    monkeypatch.setattr(verify_module, "_accumulation", lambda layers, dtype: "bfloat16")
    gru = ec.spec("keras:gru", input_size=5, units=6, reset_after=False)
    case = verify_module.verify_sequence_pair(gru, gru, source_backend="numpy", target_backend="numpy",
                                              dtype="bfloat16", seed=0)
    assert case.verdict == "pass", case.reason
    monkeypatch.setattr(verify_module, "GRID_DRAWS", 0)  # the normal draws alone
    alone = verify_module.verify_sequence_pair(gru, gru, source_backend="numpy", target_backend="numpy",
                                               dtype="bfloat16", seed=0)
    assert alone.verdict == "inconclusive" and "reset_placement" in alone.reason


@pytest.mark.parametrize(("sums", "grid_batch", "grid_draws"), [("float32", 64, 2), ("bfloat16", 1024, 4)])
def test_sums_below_float32_draw_more_and_larger_grids(monkeypatch, sums, grid_batch, grid_draws):
    """A misplaced weight's largest effect grows with the samples, the rounding bound does not."""
    monkeypatch.setattr(verify_module, "_accumulation", lambda layers, dtype: sums)
    seen = []
    real = verify_module.draw_grid

    def draw_grid(spec, **kw):
        seen.append(kw["batch"])
        return real(spec, **kw)

    monkeypatch.setattr(verify_module, "draw_grid", draw_grid)
    lstm = ec.spec("keras:lstm", input_size=3, units=4)
    verify_module.verify_sequence_pair(lstm, lstm, source_backend="numpy", target_backend="numpy", dtype="bfloat16")
    assert seen == [grid_batch] * grid_draws
    wide = ec.spec("keras:lstm", input_size=200, units=100)  # fan-in 301 (a bias too): 2^16 // 301 = 217
    seen.clear()
    verify_module.verify_sequence_pair(wide, wide, source_backend="numpy", target_backend="numpy", dtype="bfloat16",
                                       mutants=False)
    assert seen == [217 if sums == "bfloat16" else 64] * grid_draws

"""Properties of the named-tensor plans over generated spec pairs (numpy only)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import equivcheck as ec
from equivcheck.sequence import canonical, tensor_shapes
from equivcheck.sequence.reference import forward
from equivcheck.sequence.strategies import attention_pairs, recurrent_pairs


def _draw(s, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) * 0.5 for k, shape in tensor_shapes(s).items()}


def _inputs(s, rng):
    if s.kind == "attention":
        return tuple(rng.standard_normal((2, 3, s.embed_dim)) for _ in range(3))
    return rng.standard_normal((2, 3, s.input_size))


@given(st.one_of(recurrent_pairs(max_units=5, max_input_size=5), attention_pairs(max_heads=3, max_head_dim=3)),
       st.integers(0, 2**16))
def test_converted_layers_compute_the_same_function(pair, seed):
    a, b = pair
    w = _draw(a, seed)
    x = _inputs(a, np.random.default_rng(seed))
    out = ec.convert(a, b, w)
    np.testing.assert_allclose(forward(b, out, x), forward(a, w, x), atol=1e-12)
    back = ec.plan(a, b).inverse().apply(out)  # there and back: the same function again
    np.testing.assert_allclose(forward(a, back, x), forward(a, w, x), atol=1e-12)


@given(recurrent_pairs(max_units=4, max_input_size=4))
def test_plans_move_every_weight_once(pair):
    a, b = pair
    sizes = tensor_shapes(a)
    w = {k: np.arange(np.prod(s), dtype=float).reshape(s) + 1000 * i for i, (k, s) in enumerate(sizes.items())}
    ca, cb = canonical(a).apply(w), canonical(b).apply(ec.convert(a, b, w))
    for k in ca:
        want = ca[k].sum(0) if k.startswith("b") else ca[k]
        got = cb[k].sum(0) if k.startswith("b") else cb[k]
        np.testing.assert_array_equal(got, want)


def test_bad_ranges_are_refused_when_called():
    with pytest.raises(ec.SpecError, match=r"^min_units=3, max_units=2 are not a range"):
        recurrent_pairs(min_units=3, max_units=2)
    with pytest.raises(ec.SpecError, match=r"^cells=\('lstm2',\) is not valid"):
        recurrent_pairs(cells=("lstm2",))

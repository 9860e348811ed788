"""The Mapping algebra: construction, normal form, inverse, composition, rendering, dispatch."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equivcheck import Flip, Mapping, MappingError, Reshape, Transpose


def reference_apply(m: Mapping, x: np.ndarray) -> np.ndarray:
    """The ops one by one, the obvious way: the oracle for the fast paths."""
    for op in m.ops:
        if isinstance(op, Reshape):
            x = x.reshape(op.shape)
        elif isinstance(op, Transpose):
            x = x.transpose(op.perm)
        else:
            x = np.flip(x, op.axes)
    return x


def evaluate(code: str, w):
    from einops import rearrange

    return eval(code, {"w": w, "rearrange": rearrange})


@st.composite
def mappings(draw, max_ops=5):
    """Random chains of splits/merges, transposes and flips on a small shape."""
    factors = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    shape = tuple(factors)
    m = Mapping.identity(shape)
    for _ in range(draw(st.integers(0, max_ops))):
        cur = m.out_shape
        kind = draw(st.sampled_from(["transpose", "flip", "merge", "split"]))
        if kind == "transpose":
            m = m.transpose(*draw(st.permutations(range(len(cur)))))
        elif kind == "flip":
            m = m.flip(*draw(st.sets(st.integers(0, len(cur) - 1))))
        elif kind == "merge" and len(cur) > 1:
            i = draw(st.integers(0, len(cur) - 2))
            m = m.reshape(*cur[:i], cur[i] * cur[i + 1], *cur[i + 2 :])
        elif kind == "split":
            i = draw(st.integers(0, len(cur) - 1))
            divisors = [d for d in range(1, cur[i] + 1) if cur[i] % d == 0]
            d = draw(st.sampled_from(divisors))
            m = m.reshape(*cur[:i], d, cur[i] // d, *cur[i + 1 :])
    return m


def probe(shape):
    return np.arange(math.prod(shape), dtype=np.float64).reshape(shape)


class TestAlgebra:
    @given(mappings())
    def test_apply_matches_ops_one_by_one(self, m):
        x = probe(m.in_shape)
        np.testing.assert_array_equal(m.apply(x), reference_apply(m, x))

    @given(mappings())
    def test_simplify_is_equivalent_and_short(self, m):
        s = m.simplify()
        x = probe(m.in_shape)
        np.testing.assert_array_equal(reference_apply(s, x), reference_apply(m, x))
        assert len(s.ops) <= 4, s.ops

    @given(mappings())
    def test_inverse_round_trips(self, m):
        x = probe(m.in_shape)
        np.testing.assert_array_equal(m.inverse().apply(m.apply(x)), x)
        assert m.then(m.inverse()).is_identity

    @given(mappings(), st.data())
    def test_composition_applies_in_order(self, m, data):
        x = probe(m.in_shape)
        n = Mapping.identity(m.out_shape).transpose(*data.draw(st.permutations(range(len(m.out_shape)))))
        np.testing.assert_array_equal(m.then(n).apply(x), n.apply(m.apply(x)))

    @given(mappings())
    def test_rendered_code_evaluates_to_apply(self, m):
        torch = pytest.importorskip("torch", reason="torch not installed: torch code rendering is checked with it")
        x = probe(m.in_shape)
        expected = m.apply(x)
        np.testing.assert_array_equal(evaluate(m.code("numpy"), x), expected)
        if m.regular:
            np.testing.assert_array_equal(evaluate(m.code("einops"), x), expected)
        else:
            with pytest.raises(MappingError, match="einops cannot express"):
                m.code("einops")
        np.testing.assert_array_equal(evaluate(m.code("torch"), torch.from_numpy(x)).numpy(), expected)

    @given(mappings(), st.data())
    def test_source_indices_are_where_apply_reads_each_output_element(self, m, data):
        x = probe(m.in_shape)
        size = math.prod(m.out_shape)
        flat = np.array(data.draw(st.lists(st.integers(0, size - 1), max_size=8)), dtype=np.int64)
        coords = np.unravel_index(flat, m.out_shape)
        np.testing.assert_array_equal(x.reshape(-1)[m.source_indices(coords)], m.apply(x)[coords])

    @given(mappings())
    def test_dict_round_trip(self, m):
        assert Mapping.from_dict(m.to_dict()) == m


class TestNormalForm:
    def test_keras_dense_to_torch_conv_reads_as_one_liner(self):
        m = Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 7, 7, 512).transpose(0, 3, 1, 2)
        assert m.code() == "w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)"
        assert m.code("torch") == "w.reshape(7, 7, 512, 4096).permute(3, 2, 0, 1)"

    def test_theano_case_permutes_before_splitting(self):
        m = Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 512, 7, 7).flip(2, 3)
        assert m.code() == "w.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1]"

    def test_double_flip_and_double_transpose_cancel(self):
        m = Mapping.identity((3, 4)).flip(0).transpose(1, 0).transpose(1, 0).flip(0)
        assert m.is_identity
        assert m.code() == "w"

    def test_flip_of_merged_axis_is_flip_of_each_part(self):
        m = Mapping.identity((2, 3)).reshape(6).flip(0).reshape(2, 3)
        assert m.simplify().ops == (Flip((0, 1)),)

    def test_size_one_flip_is_a_no_op(self):
        assert Mapping.identity((1, 5)).flip(0).is_identity
        assert not Mapping.identity((2, 5)).flip(0).is_identity

    def test_irregular_reshape_falls_back_but_stays_correct(self):
        m = Mapping.identity((4, 6)).transpose(1, 0).reshape(4, 6)
        x = probe((4, 6))
        np.testing.assert_array_equal(m.apply(x), x.T.reshape(4, 6))
        with pytest.raises(MappingError, match="einops"):
            m.code("einops")

    @given(mappings(), mappings(), st.data())
    def test_equivalent_agrees_with_placing_every_element(self, m, other, data):
        """Decided from the atoms (no array of the kernel's size is made), it agrees with moving every element."""
        if other.in_shape != m.in_shape:  # also a chain ending where m ends, half the time
            other = m.then(Mapping.identity(m.out_shape).flip(*data.draw(st.sets(st.integers(0, len(m.out_shape) - 1)))))
        x = probe(m.in_shape)
        same = other.out_shape == m.out_shape and np.array_equal(m.apply(x), other.apply(x))
        assert m.equivalent(other) == same

    def test_equivalent_compares_element_placement(self):
        a = Mapping.identity((2, 2)).transpose(1, 0)
        b = Mapping.identity((2, 2)).reshape(4).reshape(2, 2).transpose(1, 0)
        assert a.equivalent(b)
        assert not a.equivalent(Mapping.identity((2, 2)))


class TestErrors:
    def test_wrong_input_shape_names_both_shapes(self):
        m = Mapping.identity((6, 4)).transpose(1, 0)
        with pytest.raises(MappingError, match=r"shape=\(6, 4\), got shape=\(4, 6\)"):
            m.apply(np.zeros((4, 6)))

    @pytest.mark.parametrize(
        "build, match",
        [
            (lambda: Mapping.identity((6,)).reshape(4), "6 elements"),
            (lambda: Mapping.identity((2, 3)).transpose(0, 0), "not a permutation"),
            (lambda: Mapping.identity((2, 3)).transpose(0, 1, 2), "expected 2 axes"),
            (lambda: Mapping.identity((2, 3)).flip(2), "does not fit"),
            (lambda: Mapping.identity((2,)).then(Mapping.identity((3,))), "cannot compose"),
            (lambda: Mapping.identity((2.5,)), "not a sequence of integers"),
            (lambda: Mapping.identity((2, 3)).code("jax"), "lang='jax'"),
        ],
    )
    def test_bad_construction_is_one_clear_line(self, build, match):
        with pytest.raises(MappingError, match=match) as info:
            build()
        assert "\n" not in str(info.value)

    def test_unknown_array_kind_is_refused(self):
        with pytest.raises(MappingError, match="expected a numpy, torch, tensorflow or jax array"):
            Mapping.identity((2,)).apply([1.0, 2.0])


class TestArrayKinds:
    m = Mapping.identity((12, 5)).transpose(1, 0).reshape(5, 3, 2, 2).flip(2, 3)

    def expected(self):
        return self.m.apply(probe((12, 5)))

    def test_numpy_returns_a_fresh_contiguous_array(self):
        x = probe((12, 5))
        y = Mapping.identity((12, 5)).apply(x)
        assert y.flags.c_contiguous and not np.shares_memory(x, y)

    @pytest.mark.parametrize("compiled", [True, False], ids=["compiled kernel", "numpy fallback"])
    @pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
    def test_large_arrays_take_the_blocked_paths(self, compiled, dtype, monkeypatch):
        from equivcheck import _copy

        if compiled and _copy.fastcopy() is None:
            pytest.skip("equivcheck._fastcopy was not built (no C compiler at install): the numpy fallback is tested")
        if not compiled:
            monkeypatch.setenv("EQUIVCHECK_NO_FASTCOPY", "1")
        x = np.random.default_rng(0).standard_normal((8 * 3 * 3 * 16, 1400)).astype(dtype)
        for m in (
            Mapping.identity(x.shape).transpose(1, 0).reshape(1400, 3, 3, 16, 8).transpose(0, 4, 3, 1, 2).flip(3),
            Mapping.identity(x.shape).reshape(8, 3, 3, 16, 1400).transpose(2, 4, 0, 3, 1).flip(0, 2),
        ):
            y = m.apply(x)
            np.testing.assert_array_equal(y, np.ascontiguousarray(reference_apply(m, x)))
            np.testing.assert_array_equal(m.inverse().apply(y), x)  # the reverse (conv→dense) path
            np.testing.assert_array_equal(m.inverse().apply(y), reference_apply(m.inverse(), y))
            for mapping, source, want in ((m, x, y), (m.inverse(), y, x)):
                out = np.full(mapping.out_shape, np.nan, dtype=dtype)
                assert mapping.apply(source, out=out) is out
                np.testing.assert_array_equal(out, want)

    def test_numpy_out_is_filled_and_returned(self):
        x = probe((12, 5))
        for m in (self.m, Mapping.identity((12, 5))):
            out = np.empty(m.out_shape)
            assert m.apply(x, out=out) is out
            np.testing.assert_array_equal(out, m.apply(x))

    def test_numpy_out_is_checked(self):
        x = probe((12, 5))
        m = self.m
        cases = [
            (np.empty((5, 12)), r"out has shape=\(5, 12\) dtype=float64: expected shape=\(5, 3, 2, 2\)"),
            (np.empty(m.out_shape, np.float32), r"dtype=float32: expected .* dtype=float64"),
            (np.empty((5, 3, 2, 4))[..., ::2], "not a writeable C-contiguous array"),
            (x.reshape(m.out_shape), "overlaps the input"),
            ([0.0] * 60, "out= takes a numpy array"),
        ]
        for out, match in cases:
            with pytest.raises(MappingError, match=match):
                m.apply(x, out=out)

    def test_torch(self):
        torch = pytest.importorskip("torch", reason="torch not installed")
        y = self.m.apply(torch.from_numpy(probe((12, 5))))
        assert isinstance(y, torch.Tensor) and y.is_contiguous()
        np.testing.assert_array_equal(y.numpy(), self.expected())

    def test_tensorflow(self, tf):
        y = self.m.apply(tf.constant(probe((12, 5))))
        assert tf.is_tensor(y)
        np.testing.assert_array_equal(y.numpy(), self.expected())

    def test_jax(self):
        jnp = pytest.importorskip("jax.numpy", reason="jax not installed")
        import jax

        y = self.m.apply(jnp.asarray(probe((12, 5)).astype(np.float32)))
        assert isinstance(y, jax.Array)
        np.testing.assert_array_equal(np.asarray(y), self.expected())


def test_einops_uses_axis_names_where_an_atom_is_a_whole_named_axis():
    m = Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 512, 7, 7).flip(2, 3)
    assert m.named("io", "oihw").code("einops") == "rearrange(w, '(i h w) o -> o i h w', i=512, h=7, w=7)[:, :, ::-1, ::-1]"
    assert m.named("io", "oihw").inverse().code("einops").startswith("rearrange(w[:, :, ::-1, ::-1], 'o i h w -> (i h w) o'")
    with pytest.raises(MappingError, match="in_names='abc' has 3 names"):
        m.named("abc", None)


def test_is_reshape_means_memory_order_is_kept():
    assert Mapping.identity((6, 4)).reshape(2, 3, 4).reshape(24).is_reshape
    assert Mapping.identity((6, 4)).transpose(1, 0).transpose(1, 0).is_reshape  # simplifies away
    assert not Mapping.identity((6, 4)).transpose(1, 0).is_reshape
    assert not Mapping.identity((6, 4)).flip(0).is_reshape
    assert Mapping.identity((1, 4)).transpose(1, 0).is_reshape  # a 1-wide axis moves no element


def test_source_indices_gather_a_slice_of_a_large_kernel_and_refuse_bad_coords():
    m = Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 512, 7, 7).flip(2, 3)  # theano fc6
    h, w = np.indices((7, 7))
    got = m.source_indices((0, 1, h, w))  # out 0, in 1: read from the flattened (i h w) row, mirrored
    assert got.shape == (7, 7)
    np.testing.assert_array_equal(got, (1 * 49 + (6 - h) * 7 + (6 - w)) * 4096)
    with pytest.raises(MappingError, match=r"coords on axis 2 run outside 0\.\.6"):
        m.source_indices((0, 0, 7, 0))
    with pytest.raises(MappingError, match=r"2 index arrays for out_shape=\(4096, 512, 7, 7\)"):
        m.source_indices((0, 0))
    with pytest.raises(MappingError, match="do not broadcast"):
        m.source_indices((np.zeros(2, int), np.zeros(3, int), 0, 0))

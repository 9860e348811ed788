"""Specs: validation at construction, derived shapes."""

import importlib.util

import pytest

from equivcheck import ConvSpec, DenseSpec, SpecError


class TestDenseSpec:
    def test_flatten_defaults_to_data_format(self):
        assert DenseSpec(3, (4, 5), 2, data_format="channels_last").flatten == "HWC"
        assert DenseSpec(3, (4, 5), 2).flatten == "CHW"
        assert DenseSpec(3, (2, 4, 5), 2, flatten="channels_last").flatten == "DHWC"

    def test_kernel_shape_follows_layout(self):
        assert DenseSpec(512, (7, 7), 4096).kernel_shape == (25088, 4096)
        assert DenseSpec(512, (7, 7), 4096, kernel_layout="OI").kernel_shape == (4096, 25088)

    def test_input_shape_follows_data_format(self):
        assert DenseSpec(3, (4, 5), 2, data_format="channels_last").input_shape == (4, 5, 3)
        assert DenseSpec(3, (4, 5), 2).input_shape == (3, 4, 5)

    def test_specs_are_hashable_and_immutable(self):
        a, b = DenseSpec(3, (4,), 2), DenseSpec(3, (4,), 2, name="other")
        assert a == b and hash(a) == hash(b)
        with pytest.raises(AttributeError):
            a.units = 3  # type: ignore[misc]


class TestConvSpec:
    def test_defaults(self):
        c = ConvSpec(512, 4096, (7, 7))
        assert c.kernel_layout == "OIHW" and c.kernel_shape == (4096, 512, 7, 7)
        assert c.spatial == (7, 7) and c.output_spatial == (1, 1) and c.covers_map

    def test_layout_letters_by_rank(self):
        assert ConvSpec(2, 3, (5,)).kernel_layout == "OIW"
        assert ConvSpec(2, 3, (2, 3, 4), transposed=True).kernel_layout == "IODHW"
        assert ConvSpec(2, 3, (3, 3), kernel_layout="HWIO").kernel_shape == (3, 3, 2, 3)

    def test_groups_and_depthwise_shapes(self):
        assert ConvSpec(4, 6, (3, 3), groups=2).kernel_shape == (6, 2, 3, 3)
        assert ConvSpec(4, 6, (3, 3), groups=2, transposed=True).kernel_shape == (4, 3, 3, 3)
        assert ConvSpec(4, 8, (3, 3), groups=4, kernel_layout="HWIM").kernel_shape == (3, 3, 4, 2)

    def test_output_spatial(self):
        c = ConvSpec(1, 1, (3, 3), spatial=(10, 11), stride=2, dilation=(1, 2), padding=(1, 0))
        assert c.output_spatial == (5, 4)
        same = ConvSpec(1, 1, (4,), spatial=(9,), stride=2, padding="same")
        assert same.output_spatial == (5,) and same.pads() == ((1, 2),)
        t = ConvSpec(1, 1, (3,), spatial=(4,), stride=2, padding=1, output_padding=1, transposed=True)
        assert t.output_spatial == (8,)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DenseSpec(0, (7, 7), 4), r"channels=0 must be a positive integer"),
        (lambda: DenseSpec(3, (7, -1), 4), r"spatial\[1\]=-1"),
        (lambda: DenseSpec(3, (7, 7), 2.5), r"units=2.5 is not an integer"),
        (lambda: DenseSpec(3, (7, 7), 4, flatten="CWX"), r"flatten='CWX' is not a layout"),
        (lambda: DenseSpec(3, (7, 7), 4, kernel_layout="IX"), r"kernel_layout='IX'"),
        (lambda: DenseSpec(3, (7, 7), 4, data_format="NWHC"), r"data_format='NWHC'"),
        (lambda: DenseSpec(3, (1, 2, 3, 4), 4), r"rank=4 is not supported"),
        (lambda: DenseSpec(3, "77", 4), r"spatial='77'"),
        (lambda: DenseSpec(3, (7, 7), 4, bias="yes"), r"bias='yes' is not a bool"),
        (lambda: ConvSpec(3, 4, 3), r"kernel_size=3 is a single integer"),
        (lambda: ConvSpec(3, 4, (3, 3, 3, 3)), r"expected 1 to 3 sizes"),
        (lambda: ConvSpec(3, 4, (3, 3), stride=(1, 2, 3)), r"stride=\(1, 2, 3\) has 3 entries: expected 2"),
        (lambda: ConvSpec(3, 4, (3, 3), padding="full"), r"padding='full'"),
        (lambda: ConvSpec(3, 4, (3, 3), groups=2), r"groups=2 does not divide in_channels=3"),
        (lambda: ConvSpec(3, 4, (3, 3), kernel_layout="OIHWX"), r"kernel_layout='OIHWX'"),
        (lambda: ConvSpec(3, 6, (3, 3), kernel_layout="HWIM"), r"depthwise layout: it needs groups == in_channels"),
        (lambda: ConvSpec(3, 4, (3, 3), op="conv"), r"op='conv'"),
        (lambda: ConvSpec(3, 4, (5, 5), spatial=(3, 3)), r"does not fit spatial=\(3, 3\)"),
        (lambda: ConvSpec(3, 4, (3,), output_padding=1), r"only applies to transposed"),
        (lambda: ConvSpec(3, 4, (3,), transposed=True, output_padding=2, stride=2), r"must be smaller than stride"),
        (lambda: DenseSpec(1 << 20, (1 << 10, 1 << 10), 1 << 10), r"more than the limit"),
    ],
)
def test_bad_spec_is_refused_with_one_line(build, match):
    with pytest.raises(SpecError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_same_padding_on_a_transposed_conv_multiplies_the_map_by_the_stride():
    import equivcheck as ec

    s = ec.spec("torch:conv_transpose", channels=3, spatial=(4, 5), units=2, kernel_size=(4, 6), stride=(2, 2),
                padding="same")
    assert s.padding == (1, 2) and s.output_spatial == (8, 10)
    with pytest.raises(SpecError, match=r"crops \[1\]: frameworks crop an odd or negative total differently"):
        ec.spec("keras:conv_transpose", channels=3, spatial=(4,), units=2, kernel_size=(3,), stride=2, padding="same")
    if importlib.util.find_spec("keras") and importlib.util.find_spec("torch"):  # the real frameworks agree
        src = ec.spec("torch:conv_transpose", channels=3, spatial=(4, 4), units=2, kernel_size=4, stride=2, padding="same")
        dst = ec.spec("keras:conv_transpose", channels=3, spatial=(4, 4), units=2, kernel_size=4, stride=2, padding="same")
        case = ec.verify_pair(src, dst, source_backend="torch", target_backend="keras")
        assert case.verdict in ("pass", "skip"), case.reason

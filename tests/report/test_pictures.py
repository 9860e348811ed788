"""The pictures' data: a missing flip reads the map mirrored, a wrong flatten order reads channels in stripes."""

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.mutations import mutants
from equivcheck.report.records import MAP_CELLS, reduce_map

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'equivcheck[report]'")
from equivcheck.report.pictures import _read_from, pair_picture


def _mutant(source, target, name):
    return next(m for m in mutants(source, target) if m.name == name)


def test_right_mapping_reads_the_map_in_order_and_a_missing_flip_mirrored():
    src = ec.spec("theano:dense", channels=3, spatial=(5, 4), units=2)
    dst = ec.spec("theano:conv", channels=3, spatial=(5, 4), units=2)
    position, channel = _read_from(src, dst, ec.plan(src, dst))
    assert np.array_equal(position, np.arange(20).reshape(5, 4)) and not channel.any()
    wrong, _ = _read_from(src, dst, _mutant(src, dst, "missing flip").mapping)
    assert np.array_equal(wrong, position[::-1, ::-1])


def test_a_wrong_flatten_order_reads_channels_in_stripes():
    src = ec.spec("keras:dense", channels=3, spatial=(6, 7), units=2)  # flattens HWC
    dst = ec.spec("torch:conv", channels=3, spatial=(6, 7), units=2)
    position, channel = _read_from(src, dst, _mutant(src, dst, "wrong flatten order").mapping)
    flat = np.arange(42).reshape(6, 7)  # read as CHW: row-major index → HWC position idx // 3, channel idx % 3
    assert np.array_equal(channel, flat % 3) and np.array_equal(position, flat // 3)


def test_large_layers_are_pictured_with_few_channels():
    src = ec.spec("keras:dense", channels=512, spatial=(7, 7), units=4096)
    dst = ec.spec("torch:conv", channels=512, spatial=(7, 7), units=4096)
    from equivcheck.serialize import spec_to_dict

    record = {"source": spec_to_dict(src), "target": spec_to_dict(dst), "seed": 0, "title": "vgg fc6",
              "mutations": [{"name": "wrong flatten order", "outcome": "rejected"}]}
    pic = pair_picture(record)
    assert "channels cut to ≤ 3" in pic["title"] and pic["png"].startswith("iVBOR")


def test_error_maps_keep_the_spatial_pattern_and_shrink_to_a_small_grid():
    err = np.zeros((2, 3, 5, 6))
    err[1, 2, 4, 0] = 7.0
    grid = reduce_map(err)
    assert grid["rows"] == "H" and np.array(grid["values"]).shape == (5, 6) and grid["values"][4][0] == 7.0
    big = np.zeros((4, 1, 200, 130))
    big[0, 0, 199, 129] = np.nan
    big[0, 0, 0, 0] = 1.0
    values = reduce_map(big)["values"]
    assert len(values) <= MAP_CELLS and len(values[0]) <= MAP_CELLS
    assert values[0][0] == 1.0 and values[-1][-1] is None
    flat = reduce_map(np.ones((4, 10)))
    assert (flat["rows"], flat["cols"]) == ("sample", "output unit")

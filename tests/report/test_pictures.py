"""The pictures' data, from the record alone: a missing flip reads the map mirrored, a wrong flatten order in stripes."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.mapping import Mapping
from equivcheck.mutations import mutants
from equivcheck.planning import plan
from equivcheck.report.records import MAP_CELLS, reduce_map
from equivcheck.serialize import spec_to_dict

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'equivcheck[report]'")
from equivcheck.report import pictures
from equivcheck.report.pictures import add_pictures, pair_arrays, pair_picture


def _record(source, target, title="pair"):
    """What the judge stores for a pair: the right mapping and every mutation with its mapping."""
    right = plan(source, target)
    return {"source": spec_to_dict(source), "target": spec_to_dict(target), "seed": 0, "title": title,
            "verdict": "pass", "mapping": right.to_dict(),
            "mutations": [{"name": m.name, "outcome": "ambiguous" if m.ambiguous else "rejected",
                           "mapping": m.mapping.to_dict()} for m in mutants(source, target, right)]}


def _mapping(record, name):
    return next(m["mapping"] for m in record["mutations"] if m["name"] == name)


def test_right_mapping_reads_the_map_in_order_and_a_missing_flip_mirrored():
    src = ec.spec("theano:dense", channels=3, spatial=(5, 4), units=2)
    dst = ec.spec("theano:conv", channels=3, spatial=(5, 4), units=2)
    arrays = pair_arrays(_record(src, dst))
    right, wrong = arrays["right mapping"], arrays["missing flip"]
    assert np.array_equal(right["position"], np.arange(20).reshape(5, 4)) and not right["channel"].any()
    assert not right["diff"].any()
    assert np.array_equal(wrong["position"], right["position"][::-1, ::-1])


def test_a_wrong_flatten_order_reads_channels_in_stripes():
    src = ec.spec("keras:dense", channels=3, spatial=(6, 7), units=2)  # flattens HWC
    dst = ec.spec("torch:conv", channels=3, spatial=(6, 7), units=2)
    wrong = pair_arrays(_record(src, dst))["wrong flatten order"]
    flat = np.arange(42).reshape(6, 7)  # read as CHW: row-major index → HWC position idx // 3, channel idx % 3
    assert np.array_equal(wrong["channel"], flat % 3) and np.array_equal(wrong["position"], flat // 3)


def test_the_difference_row_is_the_mappings_applied_to_all_distinct_weights():
    src = ec.spec("keras:dense", channels=4, spatial=(3, 5), units=5)
    dst = ec.spec("torch:conv", channels=4, spatial=(3, 5), units=5)
    record = _record(src, dst)
    kernel = np.arange(np.prod(src.kernel_shape), dtype=np.float64).reshape(src.kernel_shape)
    right = Mapping.from_dict(record["mapping"]).apply(kernel)
    for name, images in pair_arrays(record).items():
        if name != "right mapping":
            wrong = Mapping.from_dict(_mapping(record, name)).apply(kernel)
            expected = np.abs(right - wrong)[:3, :3].sum(axis=(0, 1))  # torch OIHW: first 3 out and in channels
            np.testing.assert_array_equal(images["diff"], expected, err_msg=name)


def test_the_picture_is_drawn_from_the_recorded_mappings():
    src = ec.spec("theano:conv", channels=3, spatial=(6, 6), units=2, kernel_size=(3, 3))
    dst = ec.spec("torch:conv", channels=3, spatial=(6, 6), units=2, kernel_size=(3, 3))
    record = _record(src, dst)
    tampered = copy.deepcopy(record)
    for m in tampered["mutations"]:
        if m["name"] == "missing flip":
            m["mapping"] = record["mapping"]  # the record now says this mutant is the right conversion
    assert pair_arrays(record)["missing flip"]["diff"].any()
    assert not pair_arrays(tampered)["missing flip"]["diff"].any()
    assert pair_picture(record)["png"] != pair_picture(tampered)["png"]


def test_an_older_record_without_mutation_mappings_gets_no_pair_picture():
    src = ec.spec("theano:conv", channels=3, spatial=(6, 6), units=2, kernel_size=(3, 3))
    dst = ec.spec("torch:conv", channels=3, spatial=(6, 6), units=2, kernel_size=(3, 3))
    record = _record(src, dst)
    old = copy.deepcopy(record)
    for m in old["mutations"]:
        del m["mapping"]
    assert pair_picture(record) is not None
    assert pair_picture(old) is None and pair_arrays(old) is None
    broken = {**copy.deepcopy(record), "mapping": {**record["mapping"], "in_shape": [1, 2]}}
    assert pair_picture(broken) is None  # a right mapping that does not fit the specs: nothing drawn
    old["comparison"] = {"max_abs_error": 1e-7, "bound_at_worst": 1e-5, "max_error_ratio": 0.01}
    drawn = add_pictures([old])
    assert list(drawn) == ["overview"] and old["pictures"] == []


def test_a_large_layer_is_pictured_from_a_few_gathered_elements(monkeypatch):
    src = ec.spec("keras:dense", channels=512, spatial=(7, 7), units=4096)  # vgg fc6: 25088 × 4096 weights
    dst = ec.spec("torch:conv", channels=512, spatial=(7, 7), units=4096)
    right = Mapping.identity(src.kernel_shape).transpose(1, 0).reshape(4096, 7, 7, 512).transpose(0, 3, 1, 2)
    as_chw = Mapping.identity(src.kernel_shape).transpose(1, 0).reshape(4096, 512, 7, 7)
    record = {"source": spec_to_dict(src), "target": spec_to_dict(dst), "title": "vgg fc6", "mapping": right.to_dict(),
              "mutations": [{"name": "wrong flatten order", "outcome": "rejected", "mapping": as_chw.to_dict()},
                            {"name": "spurious flip", "outcome": "rejected", "mapping": right.flip(2, 3).to_dict()}]}

    def refuse(*args, **kwargs):
        raise AssertionError("a picture applied a mapping to a whole kernel")

    monkeypatch.setattr(Mapping, "apply", refuse)
    arrays = pair_arrays(record)
    flat = np.arange(49).reshape(7, 7)  # CHW index c·49 + p read as HWC: position idx // 512 = 0, channel idx
    assert np.array_equal(arrays["wrong flatten order"]["channel"], flat)
    assert not arrays["wrong flatten order"]["position"].any()
    assert np.array_equal(arrays["spurious flip"]["position"], flat[::-1, ::-1])
    pic = pair_picture(record)
    assert pic["title"] == "vgg fc6: right mapping vs each wrong conversion" and pic["png"].startswith("iVBOR")
    assert "no random draw" in pic["caption"]


def test_pictures_import_nothing_that_plans_or_runs_a_check():
    tree = ast.parse(Path(pictures.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    allowed = {"equivcheck.errors", "equivcheck.mapping", "equivcheck.serialize", "equivcheck.specs"}
    assert {m for m in imported if m and m.startswith("equivcheck")} <= allowed


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

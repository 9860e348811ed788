"""check_models on real torch and Keras models: right conversions pass, each wrong one is named at its layer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck import examples as M


@pytest.fixture(scope="module")
def mc(torch, keras):
    import equivcheck.modelcheck as mc

    return mc


@pytest.fixture(scope="module")
def vgg(torch):
    return M.torch_vgg()


def test_torch_to_keras_right_conversion_passes(mc, vgg):
    result = mc.check_models(vgg, M.to_keras(vgg), input_shape=M.SHAPE)
    assert result.verdict == "pass", result.render()
    assert [(r.source, r.converted) for r in result.layers] == [
        ("features.0", "conv1"), ("features.3", "conv2"), ("classifier.0", "fc1"), ("classifier.3", "fc2")]
    assert result.first_divergence is None and not result.unpaired
    assert result.end_to_end["float32"]["passed"]
    assert result.layers[2].boundary == "flattened CHW → HWC"
    assert all(r.comparison.max_error_ratio <= 1 for r in result.layers)
    json.dumps(result.to_dict())  # serialisable as is
    assert "pass" in result.render() and "| classifier.0 |" in result.render(markdown=True)


def test_wrong_flatten_order_is_named_at_the_first_dense(mc, vgg):
    from equivcheck.planning import plan
    from equivcheck.presets import spec

    result = mc.check_models(vgg, M.to_keras(vgg, flatten="wrong"), input_shape=M.SHAPE)
    assert result.verdict == "fail"
    first = result.first_divergence
    assert (first.source, first.converted) == ("classifier.0", "fc1")
    assert first.diagnosis.startswith("wrong flatten order (CHW read as HWC)")
    right = plan(spec("torch:dense", channels=6, spatial=(3, 2), units=8),
                    spec("keras:dense", channels=6, spatial=(3, 2), units=8))
    assert first.mapping == right.code("numpy")
    assert [r.verdict for r in result.layers] == ["pass", "pass", "fail", "pass"]  # replayed alone: no accumulation
    assert "fc1" in result.reason and "wrong flatten order" in result.reason
    assert not result.end_to_end["float32"]["passed"]


def test_flatten_order_fixed_in_the_graph(mc, vgg):
    right = mc.check_models(vgg, M.to_keras(vgg, flatten="graph"), input_shape=M.SHAPE)
    assert right.verdict == "pass", right.render()
    assert "permutes the map to CHW" in right.layers[2].boundary
    wrong = mc.check_models(vgg, M.to_keras(vgg, flatten="graph-wrong"), input_shape=M.SHAPE)
    assert wrong.verdict == "fail"
    first = wrong.first_divergence
    assert first.converted == "fc1" and "CWH" in first.boundary
    assert "wrong flatten order (CHW read as CWH)" in first.diagnosis and "permutation in the graph" in first.diagnosis


def test_torch_to_torch_transposed_kernel(mc, vgg, torch):
    bad = copy.deepcopy(vgg)
    with torch.no_grad():
        bad.features[3].weight.copy_(vgg.features[3].weight.transpose(2, 3))
    result = mc.check_models(vgg, bad, input_shape=M.SHAPE)
    assert result.verdict == "fail"
    assert result.first_divergence.source == "features.3"
    assert result.first_divergence.mistake == "kernel axes permuted"
    assert result.layers[0].verdict == "pass"


@pytest.mark.parametrize("flatten", ["right", "wrong"])
def test_keras_to_torch(mc, flatten):
    source = M.keras_vgg()
    result = mc.check_models(source, M.keras_to_torch(source, flatten=flatten))  # Keras knows its input shape
    if flatten == "right":
        assert result.verdict == "pass", result.render()
        assert result.layers[0].boundary == "HWC → CHW"
    else:
        assert result.first_divergence.converted == "classifier.0"
        assert result.first_divergence.diagnosis.startswith("wrong flatten order (HWC read as CHW)")


def test_keras_to_keras(mc, keras):
    source = M.keras_vgg()
    copy_ = keras.models.clone_model(source)
    copy_.set_weights(source.get_weights())
    assert mc.check_models(source, copy_).verdict == "pass"
    weights = source.get_weights()
    weights[-1] = weights[-1][::-1].copy()  # fc2's bias reversed
    copy_.set_weights(weights)
    first = mc.check_models(source, copy_).first_divergence
    assert first.converted == "fc2" and first.mistake == "wrong bias"


def test_unpaired_layers_are_reported(mc, vgg, torch):
    extra = copy.deepcopy(vgg)
    extra.classifier.insert(3, torch.nn.Linear(8, 8))
    result = mc.check_models(vgg, extra, input_shape=M.SHAPE)
    assert [str(u) for u in result.unpaired] == ["converted classifier.3 (dense, 64 weights: no partner of the same kind and weight count)"]
    assert result.verdict == "fail"
    first = result.first_divergence
    assert first.mistake == "graph" and "converted classifier.3" in first.diagnosis


def test_a_difference_after_the_last_layer_is_never_a_silent_pass(mc, vgg, torch):
    softmaxed = torch.nn.Sequential(copy.deepcopy(vgg), torch.nn.Softmax(dim=1))
    result = mc.check_models(vgg, softmaxed, input_shape=M.SHAPE)
    assert all(r.verdict == "pass" for r in result.layers)
    assert result.verdict == "fail" and "final outputs differ" in result.reason


def test_training_mode_is_switched_off_and_restored(mc, vgg):
    vgg.train()
    result = mc.check_models(vgg, copy.deepcopy(vgg), input_shape=M.SHAPE)
    assert result.verdict == "pass"
    assert any("training mode" in n for n in result.notes)
    assert vgg.training and vgg.classifier[2].training


def test_float16_checks_cast_copies(mc, vgg):
    result = mc.check_models(vgg, copy.deepcopy(vgg), input_shape=M.SHAPE, dtypes=("float32", "bfloat16"))
    assert result.verdict == "pass" and {r.dtype for r in result.layers} == {"float32", "bfloat16"}
    assert next(vgg.parameters()).dtype.is_floating_point and str(next(vgg.parameters()).dtype) == "torch.float32"


def test_bad_input_is_one_line(mc, vgg, torch, keras):
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("kaboom")

    cases = [
        (lambda: mc.check_models(vgg, 5, input_shape=M.SHAPE), "is not a torch.nn.Module, a Keras 3 model, an ONNX model"),
        (lambda: mc.check_models(vgg, vgg), "input_shape is missing"),
        (lambda: mc.check_models(Boom(), vgg, input_shape=M.SHAPE), "kaboom"),
        (lambda: mc.check_models(vgg, M.to_keras(vgg), input_shape=(2, 3, 13, 10)), "do not fit"),
        (lambda: mc.check_models(vgg, vgg, input_shape=(2, 3, 5)), "fails on an input"),
        (lambda: mc.check_models(vgg, torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten()),
                                 input_shape=M.SHAPE), "pairs with"),
        (lambda: mc.check_models(vgg, vgg, input_shape=M.SHAPE, dtypes=("int8",)), "dtype"),
    ]  # a Keras model in another dtype is rebuilt in it (test_formats), no longer refused
    for call, words in cases:
        with pytest.raises(EquivcheckError) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)


def test_check_model_converter_raises_with_the_table(mc, vgg):
    from equivcheck.checker import ConversionCheckFailed
    from equivcheck.modelcheck import check_model_converter

    ok = check_model_converter(M.to_keras, source=M.torch_vgg, input_shape=M.SHAPE)
    assert ok.verdict == "pass"
    with pytest.raises(ConversionCheckFailed) as info:
        check_model_converter(lambda m: M.to_keras(m, flatten="wrong"), source=vgg)
    assert "classifier.0" in str(info.value) and "wrong flatten order" in str(info.value)
    # a state dict in, a state dict out, loaded into the target factory
    result = check_model_converter(lambda sd: {k: v.clone() for k, v in sd.items()}, source=vgg, state_dict=True,
                                   target=M.torch_vgg, input_shape=M.SHAPE)
    assert result.verdict == "pass"


def test_cli_command(mc, vgg, torch, tmp_path, capsys, monkeypatch):
    from equivcheck.cli import main

    torch.save(vgg.state_dict(), tmp_path / "src.pt")
    M.to_keras(vgg).save(tmp_path / "right.keras")
    M.to_keras(vgg, flatten="wrong").save(tmp_path / "wrong.keras")
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    common = ["--model", "equivcheck.modelcheck.examples:torch_vgg", "--input-shape", "2,3,12,10"]

    def run(*argv):
        return main(["check-models", *argv])

    assert run(str(tmp_path / "src.pt"), str(tmp_path / "right.keras"), *common, "--report", str(tmp_path / "r")) == 0
    assert (tmp_path / "r" / "modelcheck.md").exists()
    capsys.readouterr()
    assert run(str(tmp_path / "src.pt"), str(tmp_path / "wrong.keras"), *common, "--json") == 1
    assert json.loads(capsys.readouterr().out)["first_divergence"]["converted"] == "fc1"
    assert run(str(tmp_path / "missing.pt"), str(tmp_path / "right.keras"), *common) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_layouts_round_trip():
    from equivcheck.modelcheck.layers import Layout, flatten_order

    x = np.arange(2 * 4 * 3 * 5, dtype=np.float32).reshape(2, 4, 3, 5)  # N, C, H, W
    for order in ("CHW", "HWC", "CWH", "WHC"):
        lay = Layout((4, 3, 5), flatten=order)
        flat = lay.from_canonical(x)
        assert np.array_equal(lay.to_canonical(flat), x)
        assert flatten_order(x, "CHW", flat) == order


def test_mutants_the_data_cannot_reject_are_named():
    from equivcheck.modelcheck.judge import unrejected_mutants
    from equivcheck.presets import spec

    src = spec("torch:conv", channels=3, spatial=(8, 8), kernel_size=(3, 3), units=4)
    dst = spec("keras:conv", channels=3, spatial=(8, 8), kernel_size=(3, 3), units=4)
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(src.kernel_shape).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    varied = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert unrejected_mutants(src, dst, kernel, bias, varied, None, "float32", 27) == ([], [])
    flat = np.ones((2, 3, 8, 8), np.float32)  # a constant map: a flipped kernel gives the same sums
    missed, _ = unrejected_mutants(src, dst, kernel, bias, flat, None, "float32", 27)
    assert "spurious flip" in missed


@pytest.mark.parametrize("layer", ["dense", "conv", "depthwise"])
def test_large_layers_are_checked_on_a_twin(layer, monkeypatch):
    import equivcheck.judge as the_judge
    from equivcheck.modelcheck import judge
    from equivcheck.presets import spec

    kw = dict(channels=6, spatial=(5, 5), units=12) if layer == "dense" else \
        dict(channels=6, spatial=(7, 7), kernel_size=(3, 3), units=12 if layer == "conv" else None, multiplier=2 if layer == "depthwise" else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    src, dst = spec(f"torch:{layer}", **kw), spec(f"keras:{layer}", **kw)
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal(src.kernel_shape).astype(np.float32)
    x = rng.standard_normal((2, 6, *kw["spatial"])).astype(np.float32)
    monkeypatch.setattr(the_judge, "MUTANT_MAX_KERNEL", 16)
    outcomes, unjudged = the_judge.replayed_mutants(src, dst, kernel, None, x, dtype="float32", fan=100)
    assert outcomes and not unjudged  # judged, on the twin
    assert judge.unrejected_mutants(src, dst, kernel, None, x, None, "float32", 100) == ([], [])
    constant = np.ones_like(x)
    if layer != "dense":
        assert "spurious flip" in judge.unrejected_mutants(src, dst, kernel, None, constant, None, "float32", 100)[0]


def test_the_report_has_a_per_model_section_with_the_first_wrong_layer_marked(mc, vgg, tmp_path):
    from equivcheck.report import write_report

    result = mc.check_models(vgg, M.to_keras(vgg, flatten="wrong"), input_shape=M.SHAPE)
    write_report(tmp_path, [], extra={"model checks": [result.to_dict()]})
    text = (tmp_path / "equivcheck.md").read_text()
    assert "**First wrong layer:** classifier.0 ↔ fc1: wrong flatten order (CHW read as HWC)" in text
    assert "| → classifier.0 | fc1 | dense | float32 | fail |" in text
    page = (tmp_path / "equivcheck.html").read_text()
    assert page.count('class="first-divergence fails"') == 1 and "fc1" in page


def test_a_keras_model_nesting_a_backbone_is_traced_as_one_chain(mc, vgg, keras):
    """keras-hub's shape: a classifier wrapping a backbone model; the layers inside are paired as if flat."""
    flat = M.to_keras(vgg)
    cut = next(i for i, layer in enumerate(flat.layers) if type(layer).__name__ == "Flatten")
    backbone = keras.Sequential(flat.layers[1:cut], name="backbone")
    nested = keras.Sequential([keras.Input(flat.inputs[0].shape[1:]), backbone, *flat.layers[cut:]], name="classifier")
    result = mc.check_models(vgg, nested, input_shape=M.SHAPE)
    assert result.verdict == "pass", result.render()
    assert [r.converted for r in result.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert any("nests model 'backbone'" in n for n in result.notes)

    inp = keras.Input((4,))
    two = keras.Model(inp, keras.layers.Add()([keras.layers.Dense(4)(inp), inp]), name="two_branches")
    outer = keras.Sequential([keras.Input((4,)), two, keras.layers.Dense(2)], name="outer")
    with pytest.raises(EquivcheckError, match=r"nests model 'two_branches' and is not a chain") as err:
        mc.check_models(outer, outer)
    assert "\n" not in str(err.value)


def test_the_first_wrong_layer_carries_its_specs_and_readout_for_the_report_picture(mc, vgg, tmp_path):
    from equivcheck.report import write_report

    result = mc.check_models(vgg, M.to_keras(vgg, flatten="wrong"), input_shape=M.SHAPE)
    rows = result.to_dict()["layers"]
    first = next(r for r in rows if r["verdict"] == "fail")
    assert first["source_spec"]["kind"] == "dense" and first["converted_spec"]["kind"] == "dense"
    assert first["readout"]["position"] and "readout" not in rows[0], "only a failing pair is read out"
    write_report(tmp_path, [], extra={"model checks": [result.to_dict()]})
    page = (tmp_path / "equivcheck.html").read_text()
    assert "data:image/png;base64," in page.split('class="first-divergence fails"', 1)[1]

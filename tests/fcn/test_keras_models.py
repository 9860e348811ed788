"""Keras models: convolutionalize, verify, refuse what cannot slide — on the real Keras 3."""

from __future__ import annotations

import json

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.errors import EquivcheckError, FileFormatError
from equivcheck.fcn import HeadError
from equivcheck.fcn.commands import convolutionalize_file

from ..backends._support import skip_where_it_cannot_run


def small_functional(keras, *, padding="valid", data_format="channels_last", head=None):
    L = keras.layers
    shape = (14, 12, 3) if data_format == "channels_last" else (3, 14, 12)
    inp = keras.Input(shape)
    x = L.Conv2D(4, 3, padding=padding, activation="relu", data_format=data_format, name="c1")(inp)
    x = L.MaxPooling2D(2, data_format=data_format, name="p1")(x)
    x = L.Conv2D(5, 3, padding=padding, data_format=data_format, name="c2")(x)
    x = L.Flatten(data_format=data_format, name="flatten")(x)
    for layer in head or [L.Dense(6, activation="relu", name="fc1"), L.Dropout(0.5, name="drop"),
                          L.Dense(3, activation="softmax", name="predictions")]:
        x = layer(x)
    return keras.Model(inp, x, name="small")


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) * (0.3 if w.ndim > 1 else 0.1)
                       for w in model.get_weights()])
    return model


def test_flatten_channels_first_moves_channels_last_first(keras):
    # the fact behind the keras_cf preset: Flatten(data_format="channels_first") linearises HWC
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = np.asarray(keras.layers.Flatten(data_format="channels_first")(x))
    assert np.array_equal(flat, x.transpose(0, 2, 3, 1).reshape(2, -1))
    assert ec.spec("keras_cf:dense", channels=3, spatial=(4, 5), units=1).flatten == "HWC"


def test_functional_head_becomes_convs_and_slides(keras):
    model = randomize(small_functional(keras))
    before = [w.copy() for w in model.get_weights()]
    fcn = ec.convolutionalize(model)
    kinds = [type(layer).__name__ for layer in fcn.layers]
    assert kinds[-4:] == ["Identity", "Conv2D", "Dropout", "Conv2D"]
    assert fcn.get_layer("fc1").kernel.shape == (4, 3, 5, 6)  # covers the 4×3 map, HWIO
    assert fcn.get_layer("predictions").kernel.shape == (1, 1, 6, 3)
    # the original is untouched
    assert [type(layer).__name__ for layer in model.layers][-4:] == ["Flatten", "Dense", "Dropout", "Dense"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    result = ec.verify_model(model, fcn, crops=None)
    assert result.passed, result.summary()
    assert [c.verdict for c in result.checks] == ["pass", "pass", "pass", "pass"]  # crop applies: no padding
    assert result.total_stride == (2, 2) and result.output_positions == (2, 2)
    assert np.asarray(fcn(np.zeros((1, 40, 30, 3), np.float32))).shape == (1, 14, 10, 3)
    json.dumps(result.to_dict())


def test_channels_first_sequential_with_softmax_over_channels(keras):
    L = keras.layers
    cf = "channels_first"
    model = randomize(keras.Sequential([
        keras.Input((3, 9, 9)), L.Conv2D(4, 3, data_format=cf), L.MaxPooling2D(2, data_format=cf),
        L.Flatten(data_format=cf), L.Dense(5), L.BatchNormalization(), L.LeakyReLU(0.2), L.Dense(4, activation="softmax"),
    ], name="cf"), seed=1)
    model.layers[4].moving_variance.assign(np.linspace(0.5, 2, 5).astype(np.float32))
    skip_where_it_cannot_run(lambda: model(np.zeros((1, 3, 9, 9), np.float32)), "Keras Conv2D(channels_first)")
    fcn = ec.convolutionalize(model)
    assert type(fcn).__name__ == "Sequential"
    assert type(fcn.layers[-1]).__name__ == "Softmax" and fcn.layers[-1].get_config()["axis"] == 1
    result = ec.verify_model(model, fcn)
    assert result.passed, result.summary()
    out = np.asarray(fcn(np.random.default_rng(0).standard_normal((2, 3, 11, 11)).astype(np.float32)))
    assert out.shape == (2, 4, 2, 2) and np.allclose(out.sum(axis=1), 1, atol=1e-5)


def test_padded_body_marks_the_crop_check_not_applicable(keras):
    model = randomize(small_functional(keras, padding="same"))
    result = ec.verify_model(model, ec.convolutionalize(model))
    assert result.passed
    crop = result.check("crop")
    assert crop.verdict == "n/a" and "pads" in crop.detail and crop.max_abs_difference > 0


def test_a_wrong_kernel_is_caught(keras):
    model = randomize(small_functional(keras))
    fcn = ec.convolutionalize(model)
    layer = fcn.get_layer("fc1")
    k = np.asarray(layer.kernel)
    layer.kernel.assign(k[::-1, ::-1])  # a spurious flip of the 4×3 map
    result = ec.verify_model(model, fcn)
    assert not result.passed
    assert result.check("training size").verdict == "fail" and result.check("sliding window").verdict == "fail"


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
def test_refusals_name_the_layer(keras):
    L = keras.layers
    rnn = keras.Sequential([keras.Input((8, 3)), L.LSTM(4, return_sequences=True), L.Flatten(), L.Dense(2)])
    with pytest.raises(HeadError, match=r"'lstm.*' \(LSTM\) before the Flatten is not convolutional") as info:
        ec.convolutionalize(rnn)
    assert "\n" not in str(info.value)
    custom = small_functional(keras, head=[L.Dense(3, activation=lambda x: x * 2, name="odd")])
    with pytest.raises(EquivcheckError, match=r"layer 'odd'"):
        ec.convolutionalize(custom)
    with pytest.raises(HeadError, match="input_shape applies to torch"):
        ec.convolutionalize(rnn, input_shape=(8, 3))


def test_global_pooling_head_is_already_fine(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((10, 10, 3)), L.Conv2D(4, 3), L.GlobalAveragePooling2D(), L.Dense(2)])
    fcn = ec.convolutionalize(model)
    x = np.random.default_rng(0).standard_normal((1, 10, 10, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(fcn(x)), np.asarray(model(x)))
    assert np.asarray(fcn(np.zeros((1, 17, 23, 3), np.float32))).shape == (1, 2)
    with pytest.raises(HeadError, match="already accepts any input size"):
        ec.verify_model(model, fcn)


def test_keras_files_round_trip_and_refusals(keras, tmp_path, capsys):
    from equivcheck import files
    from equivcheck.cli import main

    model = randomize(small_functional(keras))
    src, out = tmp_path / "m.keras", tmp_path / "m_conv.keras"
    files.save_keras_model(model, src)
    convolutionalize_file(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "m_conv.keras"]  # no temp files
    before = out.read_bytes()
    with pytest.raises(FileFormatError, match="already exists"):
        convolutionalize_file(src, out)
    with pytest.raises(FileFormatError, match="is the input file"):
        convolutionalize_file(src, src, force=True)
    assert out.read_bytes() == before
    assert main(["verify-model", str(src), str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] and doc["framework"] == "keras"
    # weights only: no architecture
    weights = tmp_path / "m.weights.h5"
    files.save_keras_weights(model, weights)
    again = files.load_keras_weights(randomize(small_functional(keras), seed=5), weights)
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
    arrays = files.load_arrays(weights)  # plain HDF5 datasets, keyed by path
    assert any(a.shape == (60, 6) and np.array_equal(a, model.get_layer("fc1").get_weights()[0]) for a in arrays.values())
    assert main(["convolutionalize", str(weights), str(tmp_path / "x.keras")]) == 2
    assert "weights without the architecture" in capsys.readouterr().err


def test_a_lambda_layer_file_is_refused(keras, tmp_path):
    from equivcheck import files

    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Lambda(lambda x: x * 2), L.Dense(2)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(FileFormatError, match="carries Python code") as info:
        files.load_keras_model(path)
    assert "\n" not in str(info.value)

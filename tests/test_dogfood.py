"""The project's own conversions, checked through its own pytest plugin (the ``equivcheck`` fixture).

These run on the real frameworks named by the presets (keras, torch, scipy), so the planner's
one-liners are verified the way a user's converter would be.
"""

import numpy as np
import pytest

import equivcheck as ec


def keras_dense_to_torch_conv(kernel, bias):
    """What a user writes after reading `equivcheck plan`: VGG-style fc6 made convolutional."""
    return kernel.reshape(5, 6, 8, 3).transpose(3, 2, 0, 1), bias


def theano_answer(kernel, bias):
    """The seed's legacy answer, at a small shape."""
    return kernel.T.reshape(3, 8, 5, 6)[:, :, ::-1, ::-1], bias


def test_keras_dense_to_torch_conv(equivcheck):
    pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("keras", reason="keras not installed")
    equivcheck.check_converter(keras_dense_to_torch_conv, source="keras:dense", target="torch:conv",
                               channels=8, spatial=(5, 6), units=3)


def test_theano_one_liner(equivcheck):
    pytest.importorskip("scipy", reason="scipy not installed")
    equivcheck.check_converter(theano_answer, source="theano:dense", target="theano:conv",
                               channels=8, spatial=(5, 6), units=3)


def test_a_missing_flip_is_caught_and_named(equivcheck):
    pytest.importorskip("scipy", reason="scipy not installed")

    def forgot_flip(kernel, bias):
        return kernel.T.reshape(3, 8, 5, 6), bias

    with pytest.raises(AssertionError, match="flip"):
        equivcheck.check_converter(forgot_flip, source="theano:dense", target="theano:conv",
                                   channels=8, spatial=(5, 6), units=3)


@pytest.mark.equivcheck(kinds=["dense->conv", "conv->dense", "conv->conv"], presets=["keras", "torch", "onnx", "tflite"],
                        max_examples=8)
def test_planner_on_generated_pairs(equivcheck):
    def planned(source, target, kernel, bias):
        return ec.convert(source, target, np.asarray(kernel), bias)

    cases = equivcheck.check_pairs(planned)
    assert cases and all(c.verdict in ("pass", "skip") for c in cases)

"""The gate order of a black-box recurrent layer, found in one forward call."""

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import spec
from equivcheck.sequence.backends import run
from equivcheck.sequence.explore import find_gate_order

pytest.importorskip("torch")
KW = dict(input_size=4, units=5)


def test_finds_the_order_of_real_layers():
    calls = []

    def torch_lstm(w, x):
        calls.append(1)
        return run("torch", spec("torch:lstm", **KW), w, x)

    guess = spec("torch:lstm", gate_order="iofg", **KW)  # start from a wrong belief
    assert find_gate_order(torch_lstm, guess).gate_order == "ifgo"
    assert len(calls) == 1
    onnx = pytest.importorskip("onnxruntime") and spec("onnx:lstm", **KW)
    assert find_gate_order(lambda w, x: run("onnxruntime", onnx, w, x), onnx.replace(gate_order="ifgo")).gate_labels() == "i,o,f,c"


def test_finds_a_secret_order_and_the_reset_placement():
    secret = spec("torch:gru", gate_order="nrz", **KW)  # a checkpoint whose gate blocks were shuffled
    real = spec("torch:gru", **KW)

    def mystery(w, x):
        return run("torch", real, ec.convert(secret, real, w), x)

    found = find_gate_order(mystery, spec("torch:gru", **KW))
    assert (found.gate_order, found.reset_after) == ("nrz", True)
    onnx = spec("onnx:gru", **KW)  # linear_before_reset=0: ONNX's reset before the matmul
    found = find_gate_order(lambda w, x: run("numpy", onnx, w, x), onnx.replace(reset_after=True))
    assert (found.gate_order, found.reset_after) == ("zrn", False)


def test_refuses_a_layer_no_order_explains():
    with pytest.raises(ec.NoMapping, match="no gate order of"):
        find_gate_order(lambda w, x: np.zeros((x.shape[0], x.shape[1], 5)), spec("torch:lstm", **KW))

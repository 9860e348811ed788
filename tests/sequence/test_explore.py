"""The gate order of a black-box recurrent layer, and the head layout of a black-box attention layer,
each found in one forward call."""

import json

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.sequence import spec
from equivcheck.sequence.backends import run
from equivcheck.sequence.explore import find_gate_order
from equivcheck.sequence.head_layout import AttentionBlackBox, find_attention_layout

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


# -- attention: the head layout of a black box ------------------------------------------------
MHA = dict(embed_dim=8, heads=2)


def _run_code(code, weights):
    """The rendered numpy mapping, run as written on ``weights``."""
    out = {}
    exec(code, {"np": np, "w": weights, "out": out})
    return out


def test_torch_multihead_attention_reads_its_own_stacked_layout_and_converts_to_keras():
    import torch

    from equivcheck.sequence.verify import draw, tolerance

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(8, 2)  # batch_first=False: (time, batch, E) inside the box
    result = ec.explore(module, "keras:mha")
    assert result.found and result.forward_calls == 2
    src = result.source
    assert (src.spec.heads, src.qkv, src.axes, src.out) == (2, "qkv", "3nd", "out,in") and src.presets() == ("torch:mha",)
    assert "in_proj_weight rows (q;k;v, heads, head_dim), out_proj.weight (out, in)" in result.render()
    assert json.loads(json.dumps(result.to_dict()))["source"]["standard"] is True
    # the printed code, run as written, makes Keras compute what torch computes
    torch_spec, keras_spec = spec("torch:mha", **MHA), spec("keras:mha", **MHA)
    w, qkv = draw(torch_spec, seed=3)
    converted = _run_code(result.code["numpy"], w)
    got, want = run("numpy", keras_spec, converted, qkv), run("torch", torch_spec, w, qkv)
    assert np.abs(got - want).max() <= 2 * tolerance(torch_spec, w, qkv, "float32")


def test_keras_multihead_attention_reads_its_kernels_as_q_k_v():
    keras = pytest.importorskip("keras")

    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)  # head_dim 3: inner 6 != embed_dim 8
    x = np.zeros((1, 3, 8), dtype="float32")
    layer(x, x, key=x)
    before = [np.array(v.numpy()) for v in layer.weights]
    result = ec.explore(layer, None)
    assert result.found and result.forward_calls == 1
    assert (result.source.spec.head_dim, result.source.qkv, result.source.axes) == (3, "qkv", "3nd")
    assert "query/kernel, key/kernel, value/kernel read as q, k, v" in result.render()
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, layer.weights))  # the layer's weights put back
    refused = ec.explore(layer, "torch:mha")  # torch splits embed_dim itself: 2 heads of 3 do not fit 8
    assert not refused.found and "torch:mha cannot hold" in refused.reason


def _neox_box(torch_spec):
    """A numpy layer that reads torch's names with GPT-NeoX's per-head interleaved rows."""
    neox = torch_spec.replace(storage="neox")
    names = dict(zip(["in_proj_weight", "out_proj.weight", "in_proj_bias", "out_proj.bias"],
                     ["query_key_value.weight", "dense.weight", "query_key_value.bias", "dense.bias"]))
    return AttentionBlackBox(lambda w, *qkv: run("numpy", neox, {names[k]: v for k, v in w.items()}, qkv), torch_spec)


def test_an_interleaved_layout_is_told_apart_from_the_stacked_one():
    torch_spec = spec("torch:mha", **MHA)
    found = find_attention_layout(_neox_box(torch_spec).layer, torch_spec)
    assert (found.axes, found.qkv, found.out, found.spec.heads) == ("n3d", "qkv", "out,in", 2)
    assert "neox:mha" in found.presets() and "(heads, q;k;v, head_dim)" in found.describe()
    stacked = find_attention_layout(lambda w, *qkv: run("numpy", torch_spec, w, qkv), torch_spec, heads=2)
    assert stacked.axes == "3nd" and stacked != found
    result = ec.explore(_neox_box(torch_spec), None)  # the fix: the interleaved rows put back in torch's order
    assert result.found and result.target.axes == "3nd"
    assert result.code["numpy"].splitlines()[0] == "out['in_proj_weight'] = w['in_proj_weight'].reshape(2, 3, 4, 8).transpose(1, 0, 2, 3).reshape(24, 8)"


def test_finds_swapped_q_k_a_transposed_output_and_the_heads_count_on_real_torch():
    belief = spec("torch:mha", **MHA)  # the layer really has 4 heads
    real = spec("torch:mha", embed_dim=8, heads=4)

    def mystery(w, q, k, v):
        w = dict(w, in_proj_weight=w["in_proj_weight"].reshape(3, 8, 8)[[1, 0, 2]].reshape(24, 8),
                 in_proj_bias=w["in_proj_bias"].reshape(3, 8)[[1, 0, 2]].reshape(24),
                 **{"out_proj.weight": w["out_proj.weight"].T})
        return run("torch", real, w, (q, k, v))

    found = find_attention_layout(mystery, belief)
    assert (found.spec.heads, found.spec.head_dim, found.qkv, found.axes, found.out) == (4, 2, "kqv", "3nd", "in,out")
    assert found.presets() == ()
    # the weights converted through the found layout make the plain 4-head layer compute what the mystery does
    from equivcheck.sequence.named import from_canonical
    from equivcheck.sequence.verify import draw, tolerance

    w, qkv = draw(belief, seed=5)
    fixed = found.canonical().then(from_canonical(real)).apply(w)
    assert np.abs(run("torch", real, fixed, qkv) - mystery(w, *qkv)).max() <= 2 * tolerance(real, fixed, qkv, "float32")


def test_refuses_an_attention_layer_no_layout_explains():
    torch_spec = spec("torch:mha", **MHA)
    with pytest.raises(ec.NoMapping, match="no attention layout of"):
        find_attention_layout(lambda w, q, k, v: np.zeros_like(q), torch_spec)
    with pytest.raises(ec.NoMapping, match="output has shape"):
        find_attention_layout(lambda w, q, k, v: q[..., :4], torch_spec)
    with pytest.raises(ec.SpecError, match="kv_heads=1 with heads=2"):
        find_attention_layout(lambda w, q, k, v: q, spec("keras:mha", kv_heads=1, **MHA))


def test_explore_refuses_attention_against_a_recurrent_layer():
    result = ec.explore("torch:mha", ec.spec("torch:lstm", **KW))
    assert not result.found and "an attention layer and a recurrent one" in result.reason


def test_explore_cli_finds_the_head_layout_of_a_module_attribute(tmp_path, monkeypatch, capsys):
    import sys

    from equivcheck.cli import main

    (tmp_path / "attnmods_for_explore.py").write_text("import torch\nmha = torch.nn.MultiheadAttention(8, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["explore", "--source", "attnmods_for_explore:mha"]) == 0
    finally:
        sys.modules.pop("attnmods_for_explore", None)
    out = capsys.readouterr().out
    assert "in_proj_weight rows (q;k;v, heads, head_dim)" in out and "(the layout of torch:mha)" in out, out

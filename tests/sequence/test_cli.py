"""``equivcheck plan`` for recurrent and attention layers."""

import json

from equivcheck.cli import main


def test_plan_lstm(capsys):
    assert main(["plan", "--from", "torch:lstm", "--to", "keras:lstm", "--input-size", "32", "--units", "64"]) == 0
    out = capsys.readouterr().out
    assert "out['kernel'] = w['weight_ih_l0'].T" in out
    assert "out['bias'] = torch.stack([w['bias_ih_l0'], w['bias_hh_l0']]).sum(0)" in out


def test_plan_mha_json(capsys):
    assert main(["plan", "--from", "keras:mha", "--to", "torch:mha", "--embed-dim", "16", "--heads", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["code"]["numpy"].startswith("out['in_proj_weight'] = np.stack([w['query/kernel'], w['key/kernel'], w['value/kernel']])")


def test_plan_gru_reset_placement(capsys):
    argv = ["plan", "--from", "torch:gru", "--to", "onnx:gru", "--input-size", "3", "--units", "4", "--bidirectional"]
    assert main(argv) == 2
    assert "reset gate is applied after the recurrent matmul in one and before it in the other" in capsys.readouterr().err
    assert main([*argv, "--reset-after", "true"]) == 0
    assert ":, [1, 0, 2]]" in capsys.readouterr().out  # r,z,n -> z,r,h on the gate axis, behind the directions


def test_plan_grouped_query_attention_flags(capsys):
    argv = ["plan", "--from", "llama:mha", "--to", "keras:mha", "--embed-dim", "8", "--heads", "4", "--kv-heads", "2"]
    assert main([*argv, "--no-bias"]) == 0
    out = capsys.readouterr().out
    assert "to    keras:mha(embed_dim=8, heads=4, head_dim=2, kv_heads=2, bias=False)" in out
    assert "out['key/kernel'] = w['k_proj.weight'].T.reshape(8, 2, 2)" in out
    assert main([*argv[:-1], "3"]) == 2
    assert "kv_heads" in capsys.readouterr().err

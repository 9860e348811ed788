"""Sequence specs and presets: validation, and the dispatch through ``equivcheck.spec``."""

import pytest

import equivcheck as ec
from equivcheck.sequence import AttentionSpec, RecurrentSpec, spec


def test_presets_through_ec_spec():
    s = ec.spec("torch:lstm", input_size=32, units=64)
    assert isinstance(s, RecurrentSpec) and (s.gate_order, s.summed_bias, s.storage) == ("ifgo", False, "torch")
    assert ec.spec("onnx:lstm", input_size=3, units=4).gate_labels() == "i,o,f,c"
    assert ec.spec("keras:gru", input_size=3, units=4).gate_labels() == "z,r,h"
    assert not ec.spec("keras:gru", input_size=3, units=4, reset_after=False).reset_after
    assert ec.spec("onnx:gru", input_size=3, units=4, linear_before_reset=True).reset_after
    assert not ec.spec("onnx:gru", input_size=3, units=4).reset_after
    m = ec.spec("torch:mha", embed_dim=16, heads=4)
    assert isinstance(m, AttentionSpec) and m.head_dim == 4
    assert ec.spec("keras:mha", embed_dim=16, heads=2, head_dim=3).inner_dim == 6


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("torch:lstm", dict(input_size=0, units=4), r"^input_size=0 must be a positive integer$"),
    ("torch:lstm", dict(input_size=3), r"^units is missing for torch:lstm"),
    ("torch:lstm", dict(input_size=3, units=4, reset_after=False), r"only keras:gru and onnx:gru"),
    ("torch:mha", dict(embed_dim=10, heads=4), r"^heads=4 does not divide embed_dim=10"),
    ("onnx:mha", dict(embed_dim=8, heads=2), r"^preset='onnx' has no mha layer"),
    ("flax:gru", dict(input_size=3, units=4), r"is not a recurrent preset"),
    ("torch:lstm", dict(input_size=3, units=4, gate_order="ifgx"), r"^gate_order='ifgx' is not an order"),
])
def test_errors_name_field_and_value(name, kwargs, message):
    with pytest.raises(ec.SpecError, match=message) as info:
        spec(name, **kwargs)
    assert "\n" not in str(info.value)


def test_specs_are_frozen_and_hashable():
    s = spec("torch:gru", input_size=3, units=4)
    with pytest.raises(AttributeError):
        s.units = 5
    assert hash(s) == hash(spec("torch:gru", input_size=3, units=4))
    with pytest.raises(ec.SpecError, match="has no field 'nope'"):
        s.replace(nope=1)


def test_dense_still_needs_channels():
    with pytest.raises(ec.SpecError, match="channels is missing for keras:dense"):
        ec.spec("keras:dense", units=4)


def test_no_mapping_between_reset_placements_and_kinds():
    with pytest.raises(ec.NoMapping, match="reset gate is applied after"):
        ec.plan(spec("torch:gru", input_size=3, units=4), spec("onnx:gru", input_size=3, units=4))
    with pytest.raises(ec.NoMapping, match="units differs"):
        ec.plan(spec("torch:lstm", input_size=3, units=4), spec("keras:lstm", input_size=3, units=5))
    with pytest.raises(ec.NoMapping, match="one is a recurrent layer, the other an attention layer"):
        ec.plan(spec("torch:lstm", input_size=3, units=4), spec("torch:mha", embed_dim=4, heads=2))


def test_dense_keywords_are_refused_for_sequence_layers():
    with pytest.raises(ec.SpecError, match=r"^channels does not apply to torch:lstm: pass input_size= and units="):
        ec.spec("torch:lstm", channels=3, units=4)


def test_kv_heads_default_and_group():
    assert spec("llama:mha", embed_dim=8, heads=4).kv_heads == 4
    s = ec.spec("keras:mha", embed_dim=8, heads=4, kv_heads=2)
    assert (s.kv_heads, s.group, s.head_dim) == (2, 2, 2)
    assert s.describe() == "keras:mha(embed_dim=8, heads=4, head_dim=2, kv_heads=2)"
    assert spec("internlm2:mha", embed_dim=8, heads=4, head_dim=3, kv_heads=1).inner_dim == 12


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("llama:mha", dict(embed_dim=8, heads=4, kv_heads=3), r"^kv_heads=3 does not divide heads=4: expected a divisor"),
    ("keras:mha", dict(embed_dim=8, heads=4, kv_heads=0), r"^kv_heads=0 must be a positive integer$"),
    ("torch:mha", dict(embed_dim=8, heads=4, kv_heads=2), r"^kv_heads=2 with storage='torch': .* pass kv_heads=4"),
    ("flax:mha", dict(embed_dim=8, heads=4, kv_heads=1), r"^kv_heads=1 with storage='flax'"),
    ("torch:lstm", dict(input_size=3, units=4, kv_heads=1), r"^kv_heads=1 does not apply to torch:lstm"),
])
def test_kv_heads_errors_name_field_and_value(name, kwargs, message):
    with pytest.raises(ec.SpecError, match=message) as info:
        spec(name, **kwargs)
    assert "\n" not in str(info.value)


def test_no_mapping_between_kv_head_counts():
    with pytest.raises(ec.NoMapping, match=r"kv_heads differs \(2 vs 1\)"):
        ec.plan(spec("llama:mha", embed_dim=8, heads=4, kv_heads=2), spec("keras:mha", embed_dim=8, heads=4, kv_heads=1))


def test_the_top_level_spec_takes_bias_false_for_attention_and_refuses_unknown_fields_in_one_line():
    import equivcheck as ec
    from equivcheck.errors import SpecError

    llama = ec.spec("llama:mha", embed_dim=8, heads=4, kv_heads=2, bias=False)
    assert not llama.bias and llama.describe().endswith("kv_heads=2, bias=False)")
    with pytest.raises(SpecError, match=r"^bias=False does not apply to torch:lstm: a RecurrentSpec takes "):
        ec.spec("torch:lstm", input_size=3, units=4, bias=False)
    with pytest.raises(SpecError, match=r"^colour='red' does not apply to keras:mha"):
        ec.spec("keras:mha", embed_dim=8, heads=2, colour="red")

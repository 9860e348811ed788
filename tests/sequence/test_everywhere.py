"""Recurrent and attention layers through the faces the dense and conv kinds go through: ``verify_pair``,
``verify``, ``check_converter``, low precision, ``explore``, reports; on the real torch and Keras layers."""

import json
import sys

import numpy as np
import pytest

import equivcheck as ec
from equivcheck.judge import Case
from equivcheck.sequence.explore import RecurrentBlackBox
from equivcheck.sequence.verify import SequenceResult

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

KW = dict(input_size=4, units=5)
MHA = dict(embed_dim=8, heads=2)


def lstm_pair():
    return ec.spec("torch:lstm", **KW), ec.spec("keras:lstm", **KW)


def torch_to_keras_lstm(w):
    """A hand-written converter, as a user writes it: named tensors in, named tensors out."""
    return {"kernel": w["weight_ih_l0"].T, "recurrent_kernel": w["weight_hh_l0"].T,
            "bias": w["bias_ih_l0"] + w["bias_hh_l0"]}


def onnx_gate_order(w):
    """The blocks read as ONNX's i,o,f,c: the mistake of coremltools#93."""
    src, dst = lstm_pair()
    return ec.convert(src.replace(gate_order="iofg"), dst, w)


# -- verify_pair / verify ----------------------------------------------------------------------
def test_verify_pair_takes_sequence_specs_and_gives_a_case():
    src, dst = lstm_pair()
    case = ec.verify_pair(src, dst, source_backend="torch", target_backend="keras")
    assert isinstance(case, Case) and isinstance(case, SequenceResult)
    assert case.verdict == "pass" and case.comparison.passed and case.source_comparison.passed
    assert case.mutations and all(m.outcome == "rejected" and m.max_error_ratio > 1 for m in case.mutations)
    record = json.loads(json.dumps(case.to_dict()))
    assert record["source"]["kind"] == "recurrent" and record["verdict"] == "pass"
    assert record["plan"]["numpy"].startswith("out['kernel'] = w['weight_ih_l0'].T")
    assert {m["convention"] for m in record["mutations"]} >= {"gate order", "bias", "kernel orientation"}


def test_verify_pair_fails_naming_the_mistake_and_reports_it(tmp_path):
    src, dst = lstm_pair()
    case = ec.verify_pair(src, dst, source_backend="torch", target_backend="keras", converter=onnx_gate_order)
    assert case.verdict == "fail"
    assert "LSTM gate order: the kernel is i,f,g,o, the target reads i,o,f,c" in case.reason
    assert case.diagnosis["convention"] == "gate order" and case.diagnosis["mutant"] == "gate_order:iofg"
    from equivcheck.report import write_report

    paths = write_report(tmp_path, [case], seed=0, command="verify")
    assert "gate order" in paths[1].read_text()


def test_verify_over_backend_pairs_and_dtypes():
    src, dst = ec.spec("keras:mha", **MHA), ec.spec("torch:mha", **MHA)
    cases = ec.verify(src, dst, backends=[("keras", "torch"), ("numpy", "numpy"), ("torch", "torch")],
                      dtypes=("float32",))
    assert [c.verdict for c in cases] == ["pass", "pass", "skip"]
    assert "torch does not run keras:mha" in cases[2].reason
    with pytest.raises(ec.SpecError, match="do not apply to recurrent or attention layers"):
        ec.verify_pair(src, dst, tf32=True)
    with pytest.raises(ec.NoMapping):
        ec.verify_pair(src, ec.spec("torch:lstm", **KW))


# -- check_converter ---------------------------------------------------------------------------
def test_check_converter_passes_a_right_converter_in_every_dtype():
    cases = ec.check_converter(torch_to_keras_lstm, "torch:lstm", "keras:lstm", **KW, dtypes=("float32", "float16"))
    assert [(c.verdict, c.source_backend, c.target_backend) for c in cases] == [("pass", "torch", "keras")] * 2
    try:
        [case] = ec.check_converter(torch_to_keras_lstm, "torch:lstm", "keras:lstm", **KW, dtypes="bfloat16")
    except ec.ConversionCheckFailed as exc:  # sums in bfloat16 itself (Keras on an older CPU): too wide to judge
        case = exc.case
        assert case.verdict == "inconclusive" and case.comparison.accumulate == "bfloat16", case.reason
    assert case.comparison.passed


def test_check_converter_names_the_gate_order():
    with pytest.raises(ec.ConversionCheckFailed) as info:
        ec.check_converter(onnx_gate_order, "torch:lstm", "keras:lstm", **KW)
    message = str(info.value)
    assert "  mistake    LSTM gate order: the kernel is i,f,g,o, the target reads i,o,f,c" in message
    assert "out['recurrent_kernel'] = w['weight_hh_l0'].T" in message  # the right plan
    assert "source = ec.spec('torch:lstm', input_size=4, units=5)" in message  # a reproducer
    assert info.value.case.diagnosis["mutant"] == "gate_order:iofg"


def test_check_converter_names_q_and_k_exchanged():
    src, dst = ec.spec("torch:mha", **MHA), ec.spec("keras:mha", **MHA)

    def q_k_exchanged(w):
        out = ec.convert(src, dst, w)
        return {**out, "query/kernel": out["key/kernel"], "key/kernel": out["query/kernel"],
                "query/bias": out["key/bias"], "key/bias": out["query/bias"]}

    with pytest.raises(ec.ConversionCheckFailed, match=r"q,k,v stored, the target reads k,q,v"):
        ec.check_converter(q_k_exchanged, "torch:mha", "keras:mha", **MHA)


def test_check_converter_records_what_a_converter_returns_or_raises():
    def wrong_keys(w):
        return {"kernel": w["weight_ih_l0"].T}

    with pytest.raises(ec.ConversionCheckFailed, match=r"converter returned keys missing=\['bias', 'recurrent_kernel'\]"):
        ec.check_converter(wrong_keys, "torch:lstm", "keras:lstm", **KW)

    def raises(w):
        raise KeyError("weight_ih")

    with pytest.raises(ec.ConversionCheckFailed, match=r"\(error\)") as info:
        ec.check_converter(raises, "torch:lstm", "keras:lstm", **KW)
    assert "the converter raised KeyError" in info.value.case.reason
    with pytest.raises(ec.SpecError, match=r"^input_size=\(1, 4\) is a range"):
        ec.check_converter(torch_to_keras_lstm, "torch:lstm", "keras:lstm", input_size=(1, 4), units=5)


# -- low precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["lstm", "gru", "mha"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_passes_the_right_conversion_and_rejects_every_mutant(layer, dtype):
    sizes = MHA if layer == "mha" else KW
    for a, b in (("torch", "keras"), ("keras", "torch")):
        src, dst = ec.spec(f"{a}:{layer}", **sizes), ec.spec(f"{b}:{layer}", **sizes)
        case = ec.verify_pair(src, dst, source_backend=a, target_backend=b, dtype=dtype)
        assert case.comparison.passed and case.source_comparison.passed  # never a false alarm
        if case.comparison.accumulate == dtype:  # sums in the dtype itself (Keras on an older CPU): wide bounds
            assert case.verdict in ("pass", "inconclusive"), case.reason
            continue
        assert case.verdict == "pass", case.reason
        assert len(case.mutations) >= 4 and all(m.outcome == "rejected" for m in case.mutations)


def test_low_precision_fails_a_mutant_and_skips_what_does_not_run_it():
    src, dst = lstm_pair()
    case = ec.verify_pair(src, dst, source_backend="torch", target_backend="keras", dtype="bfloat16",
                          converter=onnx_gate_order)
    assert case.verdict == "fail" and "LSTM gate order" in case.reason
    onnx = ec.spec("onnx:lstm", **KW)
    case = ec.verify_pair(src, onnx, source_backend="torch", target_backend="onnxruntime", dtype="float16")
    assert case.verdict == "skip" and "onnxruntime does not run recurrent or attention layers in float16" in case.reason


# -- explore -----------------------------------------------------------------------------------
def test_explore_names_the_gate_order_of_an_lstm_module_in_two_calls():
    result = ec.explore(torch.nn.LSTM(4, 5, batch_first=True), "keras:lstm")
    assert result.found and result.forward_calls == 2
    assert (result.source.gate_labels(), result.target.gate_labels()) == ("i,f,g,o", "i,f,c,o")
    assert "LSTM gate order i,f,g,o" in result.render()
    assert result.code["numpy"].startswith("out['kernel'] = w['weight_ih_l0'].T")


def test_explore_finds_a_black_box_s_secret_order():
    from equivcheck.sequence.backends import run

    secret, real = ec.spec("torch:lstm", gate_order="iofg", **KW), ec.spec("torch:lstm", **KW)
    box = RecurrentBlackBox(lambda w, x: run("torch", real, ec.convert(secret, real, w), x), real)
    other = RecurrentBlackBox(lambda w, x: run("torch", real, w, x), real)
    result = ec.explore(box, other)
    assert result.found and result.source.gate_order == "iofg" and result.target.gate_order == "ifgo"
    assert json.loads(json.dumps(result.to_dict()))["source"]["gate_order"] == "i,o,f,g"


def test_explore_cli_on_a_module_attribute(tmp_path, monkeypatch, capsys):
    from equivcheck.cli import main

    (tmp_path / "seqmods_for_explore.py").write_text("import torch\nlstm = torch.nn.GRU(3, 4, batch_first=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["explore", "--source", "seqmods_for_explore:lstm"]) == 0
    finally:
        sys.modules.pop("seqmods_for_explore", None)
    out = capsys.readouterr().out
    assert "GRU gate order r,z,n, reset gate after the recurrent matmul" in out


# -- CLI convert and verify --------------------------------------------------------------------
def test_cli_convert_named_tensors_and_verify(tmp_path, capsys):
    from equivcheck.cli import main
    from equivcheck.files import load_arrays

    src, dst = lstm_pair()
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(v).astype(np.float32) for k, v in ec.sequence.tensor_shapes(src).items()}
    np.savez(tmp_path / "torch.npz", **weights)
    flags = ["--from", "torch:lstm", "--to", "keras:lstm", "--input-size", "4", "--units", "5"]
    assert main(["convert", *flags, str(tmp_path / "torch.npz"), str(tmp_path / "keras.safetensors")]) == 0
    written = load_arrays(tmp_path / "keras.safetensors")
    expected = ec.convert(src, dst, weights)
    assert sorted(written) == sorted(expected) and all(np.array_equal(written[k], expected[k]) for k in expected)
    assert main(["convert", *flags, str(tmp_path / "keras.safetensors"), str(tmp_path / "x.npz")]) == 2
    assert "lacks 'bias_hh_l0'" in capsys.readouterr().err
    assert main(["verify", *flags, "--dtype", "float32,float16"]) == 0
    assert capsys.readouterr().out.count("pass ") == 2
    assert main(["verify", "--from", "keras:mha", "--to", "torch:mha", "--embed-dim", "8", "--heads", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0]["verdict"] == "pass"

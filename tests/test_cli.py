"""The command line: plan, convert, presets, backends; one-line errors with exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from equivcheck.cli import main

FC6 = ["--channels", "512", "--spatial", "7,7", "--units", "4096"]
SMALL = ["--channels", "3", "--spatial", "4,5", "--units", "6"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_code(capsys):
    code, out, _ = run(capsys, "plan", "--from", "theano:dense", "--to", "theano:conv", *FC6)
    assert code == 0
    assert "w.T.reshape(4096, 512, 7, 7)[:, :, ::-1, ::-1]" in out


def test_plan_json_contract(capsys):
    code, out, _ = run(capsys, "plan", "--from", "keras:dense", "--to", "torch:conv", *FC6, "--json")
    data = json.loads(out)
    assert code == 0
    assert isinstance(data["ops"], list) and data["ops"][0] == {"op": "reshape", "shape": [7, 7, 512, 4096]}
    assert set(data["code"]) >= {"numpy", "torch", "einops"}
    assert data["code"]["numpy"] == "w.reshape(7, 7, 512, 4096).transpose(3, 2, 0, 1)"


def test_convert_writes_a_new_file_and_refuses_to_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(0)
    kernel, bias = rng.standard_normal((60, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    src, out = tmp_path / "dense.npz", tmp_path / "conv.npz"
    np.savez(src, kernel=kernel, bias=bias)
    args = ["convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL, str(src), str(out)]
    assert run(capsys, *args)[0] == 0
    with np.load(out) as f:
        np.testing.assert_array_equal(f["kernel"], kernel.reshape(4, 5, 3, 6).transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(f["bias"], bias)
    before = out.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == before
    assert run(capsys, *args, "--force")[0] == 0
    code, _, err = run(capsys, "convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL, str(src), str(src), "--force")
    assert code == 2 and "is the input file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.npz", "dense.npz"]  # no temp files left


@pytest.mark.parametrize(
    "argv, match",
    [
        (["plan", "--from", "keras:dense", "--to", "torch:conv", "--channels", "x"], "--channels: invalid int value"),
        (["plan", "--from", "keras:dense", "--to", "torch:conv", "--units", "3"], "--channels is required"),
        (["plan", "--from", "keras:dense", "--to", "torch:conv", *FC6, "--kernel-size", "3,3"], "smaller than the map"),
        (["plan", "--from", "keras:dense", "--to", "pytorch:conv", *FC6], "preset='pytorch' is unknown"),
        (["plan", "--from", "keras:dense", "--to", "torch:conv", "--channels", "-1", "--units", "2"], "channels=-1"),
        (["plan", "--from", "keras:dense", "--to", "torch:conv", "--channels", "2", "--spatial", "a,b", "--units", "2"], "not a comma-separated list"),
        (["convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL, "missing.npz", "out.npz"], "does not exist"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, argv, match):
    code, _out, err = run(capsys, *argv)
    assert code == 2
    assert match in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_shape_mismatch_in_file_is_a_user_error(tmp_path, capsys):
    src = tmp_path / "w.npy"
    np.save(src, np.zeros((10, 6), np.float32))
    code, _, err = run(capsys, "convert", "--from", "keras:dense", "--to", "torch:conv", *SMALL, str(src), str(tmp_path / "o.npz"))
    assert code == 2 and "kernel shape=(10, 6)" in err and "expected (60, 6)" in err


def test_presets_and_backends_list(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "theano" in out and "conv_transpose" in out
    code, out, _ = run(capsys, "backends", "--json")
    rows = json.loads(out)
    assert code == 0 and {"name": "numpy", "module": "numpy", "available": True, "version": np.__version__} in rows


def test_python_dash_m_and_console_script_work():
    out = subprocess.run([sys.executable, "-m", "equivcheck", "plan", "--from", "keras:dense", "--to", "torch:conv", *SMALL],
                         capture_output=True, text=True, check=True).stdout
    assert "w.reshape(4, 5, 3, 6).transpose(3, 2, 0, 1)" in out


def test_docs_preset_table_is_current(capsys):
    from pathlib import Path

    code, out, _ = run(capsys, "presets", "--markdown")
    docs = Path(__file__).parents[1] / "docs" / "presets.md"
    assert code == 0
    assert docs.read_text() == out, "docs/presets.md is stale: regenerate with `equivcheck presets --markdown > docs/presets.md`"


def test_backends_facts_lists_what_the_probes_found(capsys):
    from equivcheck.backends.probe import LAYER_KINDS

    code, out, _ = run(capsys, "backends", "--facts", "--json", "--backends", "numpy,scipy")
    assert code == 0
    doc = json.loads(out)
    assert doc["cpu"]
    rows = {(r["backend"], r["kind"], r["dtype"]): r for r in doc["facts"]}
    assert set(rows) == {(b, k, d) for b in ("numpy", "scipy") for k in LAYER_KINDS
                         for d in ("float32", "float16", "bfloat16", "float64")}
    assert rows["numpy", "conv2d", "float16"]["runs"] and rows["numpy", "conv2d", "float16"]["accumulate"] == "float32"
    assert not rows["scipy", "conv2d", "float16"]["runs"] and "float16" in rows["scipy", "conv2d", "float16"]["reason"]
    code, out, _ = run(capsys, "backends", "--facts", "--backends", "numpy")
    assert code == 0 and "numpy conv3d" in out and "sums in float32" in out


def test_backends_refuses_an_unknown_name_in_one_line(capsys):
    code, _, err = run(capsys, "backends", "--facts", "--backends", "numpy,nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'nope'" in err


@pytest.mark.parametrize("value", ["4,x", "4,,5", "-1", "4;5", ""])
def test_list_flags_are_strict(capsys, value):
    code, _, err = run(capsys, "plan", "--from", "keras:dense", "--to", "torch:conv", "--channels", "2",
                       "--spatial", value, "--units", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "comma-separated list of integers" in err


def test_a_flag_that_applies_to_neither_layer_is_refused(capsys):
    code, _, err = run(capsys, "plan", "--from", "keras:dense", "--to", "torch:dense", "--channels", "2",
                       "--spatial", "3,3", "--units", "3", "--kernel-size", "3,3")
    assert code == 2 and "kernel_size does not apply" in err


def test_output_padding_and_an_int_kernel_size_reach_the_specs(capsys):
    code, out, _ = run(capsys, "plan", "--from", "torch:conv_transpose", "--to", "keras:conv_transpose", "--channels", "2",
                       "--spatial", "4,4", "--units", "3", "--kernel-size", "3", "--stride", "2", "--output-padding", "1",
                       "--json")
    assert code == 0
    doc = json.loads(out)
    assert "kernel=(3, 3)" in doc["source"] and "conv_transpose" in doc["target"]


def test_explore_borrows_units_from_a_real_layer_as_the_api_does(capsys, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="explores a torch layer")
    (tmp_path / "cli_borrowed_layers.py").write_text(
        "import torch\nlayer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "explore", "--source", "cli_borrowed_layers:layer", "--to", "torch:conv", "--channels", "2",
                         "--spatial", "3,3", "--json")
    assert code == 0, err
    assert json.loads(out)["found"] is True
    del torch


def test_verify_runs_each_layer_on_its_own_framework_and_backends_add_rows(capsys):
    pytest.importorskip("torch", reason="the target runs on torch")
    pytest.importorskip("keras", reason="the source runs on keras")
    argv = ["verify", "--from", "keras:dense", "--to", "torch:conv", "--channels", "2", "--spatial", "3,3", "--units", "2"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    rows = [(c["source_backend"], c["target_backend"]) for c in json.loads(out)["cases"]]
    assert rows == [("keras", "torch")]
    code, out, _ = run(capsys, *argv, "--backends", "numpy", "--json")
    cases = json.loads(out)["cases"]
    assert [(c["source_backend"], c["target_backend"]) for c in cases] == [("keras", "torch"), ("numpy", "numpy")]
    assert cases[1]["notes"] == ["both layers on numpy (--backends)"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("1 case: 1 pass")


def test_backends_lists_versions_without_importing_a_framework():
    code = ("import sys\nfrom equivcheck.cli import main\nmain(['backends', '--json'])\n"
            "print(','.join(m for m in ('torch', 'tensorflow', 'keras', 'jax', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rows, imported = json.loads(out[: out.rindex("]") + 1]), out[out.rindex("]") + 1:].strip()
    assert imported == "", f"listing the backends imported {imported}"
    assert all(r["version"] for r in rows if r["available"])


@pytest.mark.parametrize("command", ["verify", "explore"])
def test_a_negative_seed_is_one_line(capsys, command):
    code, _, err = run(capsys, command, "--from", "keras:dense", "--to", "torch:conv", "--channels", "2", "--spatial", "3,3",
                       "--units", "2", "--seed=-1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "non-negative integer seed" in err


def test_tensorflow_start_up_lines_are_not_printed_and_the_users_setting_is_kept():
    pytest.importorskip("tensorflow", reason="TensorFlow's start-up log is what is checked")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-m", "equivcheck", "verify", "--from", "keras:dense", "--to", "tf:dense",
                          *SMALL], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", f"equivcheck printed to stderr: {run.stderr[:500]}"
    code = ("import os; from equivcheck.backends._tensorflow import import_tensorflow; import_tensorflow(); "
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "None", "the user's environment is left as it was"

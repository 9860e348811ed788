"""The demo in quick mode end to end, and import hygiene of the model layer."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_demo_writes_a_passing_report(keras, torch, tmp_path, capsys):
    from equivcheck.demo import run

    assert run(report_dir=tmp_path, quick=True) == 0
    out = capsys.readouterr().out
    assert "w.T.reshape(4096, 7, 7, 512)" in out and "pass 8/8" in out  # keras → tflite, and a checked plan
    report = tmp_path / "equivcheck.json"
    assert report.exists(), f"the demo wrote no report (equivcheck.report ships with the package): {out}"
    doc = json.loads(report.read_text())
    models = doc["extra"]["models"]
    assert [m["framework"] for m in models] == ["torch", "keras"]
    assert all(m["passed"] for m in models)
    assert all(c["verdict"] == "pass" for m in models for c in m["checks"])  # unpadded: the crop check applies
    assert len(doc["cases"]) == 12 * 12 and all(c["verdict"] == "pass" for c in doc["cases"])


def test_models_import_no_framework():
    code = ("import sys, equivcheck as ec; ec.convolutionalize; ec.verify_model; import equivcheck.demo, equivcheck.files;"
            "import equivcheck.fcn.sliding, equivcheck.fcn.commands;"
            "print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

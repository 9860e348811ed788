"""The committed example report: ``make demo`` regenerates it, without churn when nothing changed."""

from __future__ import annotations

import json

from equivcheck.report.example import main


def test_rerun_keeps_an_up_to_date_example_and_rewrites_a_stale_one(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(first) == {"equivcheck.json", "equivcheck.md", "equivcheck.html"}
    assert main([str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first  # same run id, no temp files left
    doc = json.loads(first["equivcheck.json"])
    doc["run"]["seed"] = 99  # a stale example: anything beyond the run id and time differs
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    assert main([str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "equivcheck.json").read_text())["run"]["seed"] == 0


def test_the_example_names_no_run_time_or_machine_and_ignores_machine_numbers(tmp_path, capsys):
    import platform

    assert main([str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "equivcheck.json").read_text())
    assert doc["run"]["run_id"] == "example" and doc["run"]["created"].startswith("2026-01-01T00:00:00")
    for name in ("equivcheck.json", "equivcheck.md", "equivcheck.html"):
        assert platform.platform() not in (tmp_path / name).read_text(), name  # no kernel string
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    doc["environment"]["frameworks"]["torch"] = {"version": "0.0-elsewhere", "imported": True}  # another machine's
    doc["environment"]["facts"] = []
    doc["cases"][0]["comparison"]["max_error_ratio"] = 0.123  # its own rounding
    doc["cases"][0]["mutations"][0]["max_error_ratio"] = 7.0
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0 and "up to date" in capsys.readouterr().out
    assert (tmp_path / "equivcheck.md").read_bytes() == written["equivcheck.md"]
    doc["cases"][0]["mutations"][0]["outcome"] = "not rejected"  # what the example shows changed: written again
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    assert main([str(tmp_path)]) == 0 and "wrote" in capsys.readouterr().out


def test_an_example_with_a_run_id_and_a_kernel_string_is_written_once_more(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "equivcheck.json").read_text())
    doc["run"]["run_id"], doc["environment"]["platform"] = "a74b3ef9", "Linux-6.18.44-x86_64"  # as committed before
    (tmp_path / "equivcheck.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0 and "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "equivcheck.json").read_text())["run"]["run_id"] == "example"

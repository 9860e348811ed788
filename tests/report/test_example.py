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

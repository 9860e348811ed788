"""equivcheck.json / .md / .html from a real run: schema, content, rebuild, atomic replacement, merging."""

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

import equivcheck as ec
from equivcheck.cli import main as cli_main
from equivcheck.errors import FileFormatError, SpecError
from equivcheck.report import (
    FILES,
    case_record,
    merge_cases,
    rebuild,
    schema,
    validate,
    write_report,
)
from equivcheck.report.conventions import COLUMNS
from equivcheck.report.parts import PARTS_DIR


def _png_size(b64: str) -> tuple[int, int]:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_real_output_matches_the_json_schema(doc):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed: pip install 'equivcheck[report]'")
    jsonschema.Draft202012Validator.check_schema(schema())
    errors = list(jsonschema.Draft202012Validator(schema()).iter_errors(doc))
    assert errors == []
    broken = json.loads(json.dumps(doc))
    broken["cases"][0]["verdict"] = "maybe"
    with pytest.raises(FileFormatError, match="cases/0/verdict"):
        validate(broken)


def test_document_records_the_run_environment_and_every_case(doc, cases):
    assert doc["schema_version"] == "1.1"
    assert re.fullmatch(r"[0-9a-f]{32}", doc["run"]["run_id"])
    assert doc["run"]["seed"] == 0 and doc["run"]["command"] == "pytest"
    assert doc["environment"]["seed"] == 0 and doc["environment"]["numpy"]
    assert len(doc["cases"]) == len(cases)
    for record, case in zip(doc["cases"], cases):
        assert record["verdict"] == case.verdict
        assert record["source_backend"] == case.source_backend and record["dtype"] == case.dtype
        assert record["comparison"]["max_abs_error"] == pytest.approx(case.comparison.max_abs_error)
        assert record["comparison"]["worst_index"] == list(case.comparison.worst_index)
        assert record["mapping"]["code"]["numpy"] == case.mapping.code("numpy")
        assert [m["outcome"] for m in record["mutations"]] == [m.outcome for m in case.mutations]
    verdicts = [c.verdict for c in cases]
    assert doc["summary"]["verdicts"] == {v: verdicts.count(v) for v in ("pass", "fail", "inconclusive", "skip", "error")}
    assert doc["summary"]["ok"] is False
    assert doc["extra"] == {"explorations": [{"source": "a:dense", "found": "w.T"}]}


def test_failures_are_diagnosed_as_the_mistake_the_converter_makes(doc):
    failed = {r["title"]: r for r in doc["cases"] if r["verdict"] == "fail"}
    assert failed["keras:dense → torch:conv"]["diagnosis"]["mutant"] == "wrong flatten order"
    assert failed["theano:dense → theano:conv"]["diagnosis"]["mutant"] == "missing flip"
    for r in failed.values():
        assert r["error_map"]["values"] and r["error_map"]["rows"] == "sample"


def test_convention_matrix_blames_the_right_convention(doc):
    assert doc["conventions"]["columns"] == list(COLUMNS)
    rows = {r["conversion"]: {c: v["state"] for c, v in r["cells"].items()} for r in doc["conventions"]["rows"]}
    assert rows["keras:dense → torch:conv"] == {
        "flip": "holds", "flatten order": "fails", "kernel transposed": "holds", "kernel axes": "holds", "channels": "holds",
        "channel order": "n/a", "padding": "n/a", "bias": "n/a"}
    assert rows["theano:dense → theano:conv"]["flip"] == "fails"
    assert rows["theano:dense → theano:conv"]["flatten order"] == "holds"
    # two convs: nothing is flattened
    conv = rows["torch:conv → keras:conv"]
    assert conv["flatten order"] == "n/a"
    assert conv["flip"] == conv["kernel axes"] == conv["channels"] == "holds"


def test_pictures_are_embedded_pngs_referenced_by_cases(doc):
    pictures = doc["pictures"]
    assert "overview" in pictures
    for record in doc["cases"]:
        assert record["pictures"], record["title"]
        for pid in record["pictures"]:
            width, height = _png_size(pictures[pid]["png"])
            assert width > 100 and height > 100
        if record["verdict"] == "fail":
            assert any(p.startswith("failure-") for p in record["pictures"])


def test_markdown_has_header_matrix_failures_and_counts(report_dir, doc):
    md = (report_dir / "equivcheck.md").read_text(encoding="utf-8")
    assert doc["run"]["run_id"] in md and "seed 0" in md and f"numpy {doc['environment']['numpy']}" in md
    assert "| keras:dense → torch:conv | ❌ fail | 2 | ✅ holds | ❌ fails |" in md
    assert "looks like: **missing flip**" in md and "worst element [" in md
    assert "2 fail" in md and "## Explorations" in md and "| a:dense | w.T |" in md


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [(tag, v) for k, v in attrs if k in ("src", "href") and v is not None]


def test_html_is_self_contained(report_dir, doc):
    page = (report_dir / "equivcheck.html").read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    assert "script" not in parser.tags
    assert parser.urls and all(url.startswith("data:") for _, url in parser.urls)
    imgs = [url for tag, url in parser.urls if tag == "img"]
    assert len(imgs) == len(doc["pictures"]) and all(u.startswith("data:image/png;base64,iVBOR") for u in imgs)
    assert "Content-Security-Policy" in page and 'id="conventions"' in page
    assert not re.search(r"url\(|@import|https?://", page.split("<body>")[0])


def test_rebuild_from_the_json_alone_reproduces_markdown_and_html(report_dir, tmp_path):
    shutil.copy(report_dir / "equivcheck.json", tmp_path / "equivcheck.json")
    paths = rebuild(tmp_path / "equivcheck.json")
    assert [p.name for p in paths] == ["equivcheck.md", "equivcheck.html"]
    for name in ("equivcheck.md", "equivcheck.html"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (report_dir / name).read_text(encoding="utf-8")


def test_cli_report_rebuilds_into_another_folder(report_dir, tmp_path, capsys):
    assert cli_main(["report", str(report_dir / "equivcheck.json"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "equivcheck.html").read_text(encoding="utf-8") == (
        report_dir / "equivcheck.html").read_text(encoding="utf-8")
    assert "wrote" in capsys.readouterr().out


def test_a_second_run_replaces_every_file_whole(cases, tmp_path):
    write_report(tmp_path, cases, run_id="first0run", seed=0)
    write_report(tmp_path, cases[:1], run_id="second0run", seed=0)
    for name in FILES:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "second0run" in text and "first0run" not in text
    doc = json.loads((tmp_path / "equivcheck.json").read_text(encoding="utf-8"))
    assert len(doc["cases"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no temporary files left


def test_records_merge_without_duplicates_and_old_part_folders_are_cleared(cases, tmp_path):
    first, second = [case_record(c) for c in cases[:3]], [case_record(c) for c in cases[1:]]  # overlapping
    merged = merge_cases(first, second)
    assert [r["id"] for r in merged] == [case_record(c)["id"] for c in cases]
    (tmp_path / PARTS_DIR).mkdir()
    (tmp_path / PARTS_DIR / "old.gw0.json").write_text("{}")  # left by an older version
    write_report(tmp_path, merged, run_id="run1")
    assert not (tmp_path / PARTS_DIR).exists()
    doc = json.loads((tmp_path / "equivcheck.json").read_text(encoding="utf-8"))
    assert len(doc["cases"]) == len(cases) and doc["run"]["run_id"] == "run1"
    assert merge_cases(cases, merged) == merged


def test_a_plain_case_dict_and_its_full_record_merge_into_one(cases):
    failed = [c for c in cases if c.verdict == "fail"]
    merged = merge_cases([c.to_dict() for c in failed], failed)
    assert len(merged) == len(failed)
    assert all(r["diagnosis"]["mutant"] for r in merged)  # filled in from the fuller record


def test_markdown_is_appended_to_the_github_step_summary(cases, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    write_report(tmp_path / "r", cases[:1])
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n") and text.endswith((tmp_path / "r" / "equivcheck.md").read_text(encoding="utf-8") + "\n")


def test_nonfinite_results_and_generic_sections_serialise(cases, tmp_path):
    record = cases[0].to_dict()
    record["verdict"], record["reason"] = "fail", "3 NaN/Inf of 8 outputs"
    record["comparison"].update(max_abs_error=float("nan"), max_error_ratio=float("inf"), passed=False)
    extra = {"models": {"vgg16": {"layers": 3, "ok": True}}, "note": "plain text"}
    write_report(tmp_path, [record], extra=extra)
    doc = json.loads((tmp_path / "equivcheck.json").read_text(encoding="utf-8"))
    validate(doc)
    assert doc["cases"][0]["comparison"]["max_abs_error"] is None
    html = (tmp_path / "equivcheck.html").read_text(encoding="utf-8")
    assert "<h2>Models</h2>" in html and "vgg16" in html and "plain text" in html


@pytest.mark.parametrize("bad, match", [
    ("not json", "not valid JSON"),
    ('{"schema_version": "2.0"}', "schema_version='2.0' is not readable"),
    ('{"cases": []}', "has no schema_version"),
])
def test_rebuild_refuses_what_is_not_a_report(tmp_path, bad, match):
    path = tmp_path / "equivcheck.json"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(FileFormatError, match=match) as info:
        rebuild(path)
    assert "\n" not in str(info.value)


def test_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        rebuild(tmp_path / "missing.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileFormatError, match="is a file"):
        write_report(tmp_path / "file", [])
    with pytest.raises(SpecError, match="not a list of cases"):
        write_report(tmp_path, "cases")
    with pytest.raises(SpecError, match="not a Case or a case dict"):
        write_report(tmp_path, [object()])
    assert cli_main(["report", str(tmp_path / "missing.json")]) == 2


def test_the_environment_records_the_probed_facts_the_cases_used(tmp_path):
    from equivcheck.report import write_report
    from equivcheck.verification import verify_pair

    case = verify_pair(ec.spec("onnx:dense", channels=2, spatial=(3, 3), units=4),
                       ec.spec("torch:conv", channels=2, spatial=(3, 3), units=4), dtype="bfloat16")
    write_report(tmp_path, [case])
    doc = json.loads((tmp_path / "equivcheck.json").read_text())
    facts = doc["environment"]["facts"]
    assert {f["dtype"] for f in facts} == {"bfloat16"} and len(facts) == 2
    assert all(f["runs"] and f["accumulate"] for f in facts)
    assert "Machine facts (probed here)" in (tmp_path / "equivcheck.md").read_text()
    assert "Machine facts (probed here)" in (tmp_path / "equivcheck.html").read_text()


def test_every_field_is_escaped_in_html_and_markdown_without_the_schema(cases):
    """Validation is a second line of defence: a hostile document renders inert even when it is not validated."""
    from equivcheck.report import render
    from equivcheck.report.jsonio import build_document
    from equivcheck.report.records import case_record

    evil = '<meta http-equiv="refresh" content="0;url=https://x.invalid">'
    doc = build_document([case_record(c) for c in cases[:2]], run_id="r1", command=evil)
    case = doc["cases"][0]
    case.update(title=evil, reason=evil, verdict="fail", dtype=evil, diagnosis={"mutant": evil, "convention": evil,
                                                                                 "description": evil})
    doc["conventions"]["rows"][0]["cases"] = evil
    doc["summary"]["verdicts"]["pass"] = evil
    doc["pictures"] = {"x": {"png": '"><script>alert(1)</script>', "title": evil, "caption": evil}}
    case["pictures"] = ["failure-x"]
    doc["pictures"]["failure-x"] = doc["pictures"]["x"]
    texts = render(doc)
    texts["equivcheck.md"] = outside_code(texts["equivcheck.md"])  # a code span shows its text as it is: inert
    for name, text in texts.items():
        assert '<meta http-equiv="refresh"' not in text and "<script>" not in text, name


def outside_code(markdown: str) -> str:
    """``markdown`` without its fenced blocks and inline code spans: the text a renderer reads as markup."""
    markdown = re.sub(r"^(`{3,})[^\n]*\n.*?^\1[ \t]*$", "", markdown, flags=re.S | re.M)
    return re.sub(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)", "", markdown)


@pytest.mark.parametrize(("text", "words"), [
    ('{"x":' * 5000 + "1" + "}" * 5000, "nests too deeply"),
    ('{"schema_version": "1.0", "n": ' + "9" * 5000 + "}", "number equivcheck will not read"),
])
def test_hostile_report_json_is_one_line(tmp_path, capsys, text, words):
    path = tmp_path / "equivcheck.json"
    path.write_text(text)
    assert cli_main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["equivcheck.json"]

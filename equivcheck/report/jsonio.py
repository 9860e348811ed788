"""``equivcheck.json``: build, serialise, load and validate the versioned report document.

The document (schema in ``schema.json`` beside this module, ``schema_version`` "1.1"):

- ``run``: ``run_id``, ``created`` (ISO 8601, UTC), ``command``, ``seed``;
- ``environment``: see :func:`equivcheck.report.environment.environment`;
- ``summary``: counts per verdict and per mutation outcome, and ``verdict``: the whole run's
  (the worst of its cases, explorations and model checks; ``inconclusive`` when nothing was checked);
- ``conventions``: the matrix of :mod:`equivcheck.report.conventions`;
- ``cases``: one record per case (:mod:`equivcheck.report.records`);
- ``pictures`` (optional): ``{id: {"title", "caption", "png"}}``, PNG in base64, referenced
  by each case's ``pictures`` list and by ``"overview"``;
- ``extra`` (optional): sections other parts add (``explorations``, ``models``, …).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError

__all__ = ["SCHEMA_VERSION", "build_document", "check_summary", "dumps", "load", "schema", "summary", "validate"]

SCHEMA_VERSION = "1.1"
VERDICTS = ("pass", "fail", "inconclusive", "skip", "error")
OUTCOMES = ("rejected", "not rejected", "ambiguous")


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per verdict and per mutation outcome; ``ok`` when nothing failed, errored or was inconclusive."""
    verdicts = dict.fromkeys(VERDICTS, 0)
    outcomes = dict.fromkeys(OUTCOMES, 0)
    for r in records:
        verdicts[r.get("verdict", "error")] = verdicts.get(r.get("verdict", "error"), 0) + 1
        for m in r.get("mutations") or []:
            outcomes[m.get("outcome")] = outcomes.get(m.get("outcome"), 0) + 1
    ok = all(verdicts[v] == 0 for v in ("fail", "inconclusive", "error"))
    return {"cases": len(records), "verdicts": verdicts, "mutations": outcomes, "ok": ok}


def build_document(
    records: Sequence[dict[str, Any]],
    *,
    seed: int | None = None,
    command: str = "",
    run_id: str | None = None,
    environment: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    pictures: dict[str, Any] | None = None,
    failed: bool = False,
    created: str | None = None,
) -> dict[str, Any]:
    """The report document for already-built records (``failed``: the run failed for a reason of its own;
    ``created``: the ISO 8601 time to record, default now, fixed for a committed example)."""
    from equivcheck.report.conventions import matrix
    from equivcheck.report.describe import verdict_of
    from equivcheck.report.environment import environment as current_environment
    from equivcheck.report.records import to_jsonable

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run": {
            "run_id": run_id or uuid.uuid4().hex,
            "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "seed": seed,
        },
        "environment": to_jsonable({**(environment if environment is not None else current_environment(seed)),
                                    "facts": facts_used(records)}),
        "summary": summary(records),
        "conventions": matrix(records),
        "cases": list(records),
    }
    if pictures:
        doc["pictures"] = pictures
    if extra:
        doc["extra"] = to_jsonable(extra)
    verdict = verdict_of([r.get("verdict", "error") for r in records], doc.get("extra"), ok=not failed)
    doc["summary"]["verdict"] = verdict
    doc["summary"]["ok"] = doc["summary"]["ok"] and not failed and verdict in ("pass", "skip")
    return doc


def facts_used(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The probed machine facts the cases were judged by, once each (see equivcheck.backends.probe)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for record in records:
        for facts in (record.get("facts") or {}).values():
            if isinstance(facts, dict):
                seen.setdefault((facts.get("backend"), facts.get("layer"), facts.get("dtype")), facts)
    return list(seen.values())


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def schema() -> dict[str, Any]:
    """The JSON Schema of ``equivcheck.json``."""
    text = resources.files("equivcheck.report").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate(doc: Any, *, where: str = "report") -> None:
    """Raise :class:`FileFormatError` (one line) unless ``doc`` is a report of a readable schema version."""
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise FileFormatError(f"{where} has no schema_version: expected an equivcheck.json written by write_report")
    version = str(doc["schema_version"])
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise FileFormatError(
            f"{where} schema_version={version!r} is not readable: this equivcheck reads {SCHEMA_VERSION.split('.')[0]}.x; "
            "rewrite the report with this version"
        )
    try:
        import jsonschema
    except ImportError:  # the report extra is optional: check the parts rendering needs
        for key in ("run", "environment", "summary", "conventions", "cases"):
            if key not in doc:
                raise FileFormatError(f"{where} has no {key!r}: expected an equivcheck.json written by write_report") from None
        return
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(doc))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise FileFormatError(f"{where} does not match the report schema at {path}: {error.message[:200]}")


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate an ``equivcheck.json``."""
    from equivcheck.memory import require_memory

    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"report={str(p)!r} does not exist or is not a file: pass the path of an equivcheck.json")
    require_memory(f"reading report={str(p)!r}", 16 * p.stat().st_size)  # parsed JSON takes many times its text
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"report={str(p)!r} is not valid JSON ({exc}): expected an equivcheck.json") from None
    except RecursionError:
        raise FileFormatError(f"report={str(p)!r} nests too deeply to be an equivcheck.json") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise FileFormatError(f"report={str(p)!r} holds a number equivcheck will not read ({str(exc)[:80]})") from None
    validate(doc, where=f"report={str(p)!r}")
    check_summary(doc, where=f"report={str(p)!r}")
    return doc


def check_summary(doc: dict[str, Any], *, where: str = "report") -> None:
    """Raise :class:`FileFormatError` (one line) unless the summary's counts and verdict are those its cases give.

    The page is drawn from the summary, so a document whose summary says ``pass`` over a failing
    case is refused rather than rendered. The only freedom left is a run that failed for a reason
    of its own (``write_report(failed=True)``): its verdict is ``fail`` and ``ok`` false.
    """
    from equivcheck.report.describe import verdict_of

    stated = doc.get("summary")
    cases = doc.get("cases")
    if not isinstance(stated, dict) or not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise FileFormatError(f"{where} has no summary object and list of case objects: expected an equivcheck.json "
                              "written by write_report")
    extra = doc.get("extra")
    try:
        counted = summary(cases)
        verdicts = [c.get("verdict", "error") for c in cases]
        passing = verdict_of(verdicts, extra if isinstance(extra, dict) else None, ok=True)
        failing = verdict_of(verdicts, extra if isinstance(extra, dict) else None, ok=False)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        raise FileFormatError(f"{where} holds cases equivcheck cannot count ({type(exc).__name__}): expected an "
                              "equivcheck.json written by write_report") from None
    for field in ("cases", "verdicts", "mutations"):
        if stated.get(field) != counted[field]:
            raise FileFormatError(f"{where} summary {field}={_short(stated.get(field))} disagrees with its cases, which "
                                  f"give {_short(counted[field])}: refused; write the report again")
    verdict = stated.get("verdict", passing)
    if verdict not in (passing, failing):
        raise FileFormatError(f"{where} summary verdict={_short(verdict)} disagrees with its cases, which give "
                              f"{passing!r}: refused; write the report again")
    ok = counted["ok"] and verdict == passing and verdict in ("pass", "skip")
    if stated.get("ok", ok) != ok:
        raise FileFormatError(f"{where} summary ok={_short(stated.get('ok'))} disagrees with its cases and verdict "
                              f"{verdict!r}, which give ok={ok}: refused; write the report again")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."

"""Reports of a verification run: ``equivcheck.json`` (versioned), ``equivcheck.md``, ``equivcheck.html``.

    from equivcheck.report import write_report
    write_report("reports", verify(src, dst, backends=["numpy", "torch"]), seed=0, command="verify")

:func:`write_report` takes :class:`~equivcheck.verification.Case` objects or their records (dicts,
e.g. from pytest-xdist workers; duplicates collapse by id), draws the pictures, and replaces
the three files together, atomically. :func:`rebuild` renders Markdown and HTML again from
the JSON alone. Importing this package imports no deep-learning framework; matplotlib is
imported only to draw.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError, SpecError
from equivcheck.files import atomic_path
from equivcheck.report.environment import environment
from equivcheck.report.jsonio import SCHEMA_VERSION, build_document, dumps, load, schema, validate
from equivcheck.report.parts import clear_parts
from equivcheck.report.records import case_record, merge_cases, to_jsonable

__all__ = [
    "FILES",
    "SCHEMA_VERSION",
    "case_record",
    "environment",
    "load",
    "merge_cases",
    "rebuild",
    "render",
    "schema",
    "validate",
    "write_report",
]

FILES = ("equivcheck.json", "equivcheck.md", "equivcheck.html")


def _folder(directory: str | os.PathLike[str]) -> Path:
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise FileFormatError(f"report folder={str(folder)!r} is a file: pass a folder to write the report into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"report folder={str(folder)!r} cannot be created ({exc.strerror})") from None
    return folder


def render(doc: dict[str, Any]) -> dict[str, str]:
    """``{file name: text}`` of the Markdown and HTML for a report document."""
    from equivcheck.report import html, markdown

    return {"equivcheck.md": markdown.render(doc), "equivcheck.html": html.render(doc)}


def _write_all(folder: Path, texts: dict[str, str]) -> list[Path]:
    """Write every file to a temporary name first, then rename them all: all replaced, or none."""
    paths = [folder / name for name in texts]
    with contextlib.ExitStack() as stack:
        for path, text in zip(paths, texts.values()):
            tmp = stack.enter_context(atomic_path(path, force=True))
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)  # a report is for reading: not the private mode of a temporary file
    return paths


def _step_summary(markdown: str) -> None:
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(markdown + "\n")
    except OSError as exc:
        warnings.warn(f"GITHUB_STEP_SUMMARY={target!r} is not writable ({exc.strerror}): summary not appended",
                      stacklevel=3)


def write_report(
    directory: str | os.PathLike[str],
    cases: Iterable[Any],
    *,
    seed: int | None = None,
    command: str = "",
    run_id: str | None = None,
    environment: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    failed: bool = False,
    created: str | None = None,
) -> list[Path]:
    """Write ``equivcheck.json``, ``.md`` and ``.html`` for ``cases`` into ``directory``.

    ``run_id``, ``created`` and ``environment`` default to a new id, now and this machine's;
    a committed example fixes them so that regenerating it changes nothing.

    ``failed``: the run failed for a reason of its own (a pytest session with failures): the
    report's ``ok`` is then false whatever its cases say.

    ``cases``: :class:`~equivcheck.verification.Case` objects and/or case records (``Case.to_dict()``
    or :func:`case_record` dicts, from any number of workers; duplicates dropped by id).
    ``extra``: further sections, e.g. ``{"explorations": [...], "models": [...]}``, stored
    under ``extra`` and rendered as tables. Also appends the Markdown to
    ``$GITHUB_STEP_SUMMARY`` when set, and removes the folder's xdist part files.
    Returns the three paths.
    """
    if isinstance(cases, (dict, str, bytes)) or hasattr(cases, "to_dict") or not isinstance(cases, Iterable):
        raise SpecError(f"cases={type(cases).__name__} is not a list of cases: pass a list of Case objects or case dicts")
    if extra is not None and not isinstance(extra, dict):
        raise SpecError(f"extra={type(extra).__name__} is not a dict: pass sections as {{'name': [...]}}")
    folder = _folder(directory)
    records = merge_cases(list(cases))
    extra = to_jsonable(extra) if extra else None  # a copy: model checks gain their pictures' ids
    try:
        from equivcheck.report.pictures import add_pictures
        from equivcheck.report.readout import add_model_pictures

        pictures = add_pictures(records)
        pictures.update(add_model_pictures(extra or {}))
    except ImportError as exc:  # matplotlib is the optional 'report' extra
        warnings.warn(f"report pictures skipped: {exc} (install equivcheck[report])", stacklevel=2)
        pictures = {}
        for r in records:
            r["pictures"] = []
    doc = build_document(records, seed=seed, command=command, run_id=run_id, environment=environment,
                         extra=extra, pictures=pictures, failed=failed, created=created)
    texts = {"equivcheck.json": dumps(doc), **render(doc)}
    paths = _write_all(folder, texts)
    clear_parts(folder)
    _step_summary(texts["equivcheck.md"])
    return paths


def rebuild(json_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Render ``equivcheck.md`` and ``equivcheck.html`` again from an ``equivcheck.json`` alone."""
    doc = load(json_path)
    folder = _folder(out_dir if out_dir is not None else Path(json_path).parent)
    try:
        pages = render(doc)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:  # valid JSON, not our shape
        raise FileFormatError(f"report={str(json_path)!r} does not hold what equivcheck writes "
                              f"({type(exc).__name__}: {str(exc)[:80]}): rebuild only an equivcheck.json") from None
    return _write_all(folder, pages)

"""Every example in README.md and docs/*.md runs as written, each its own test (``FILE:LINE``).

Per Markdown file, in order, in one temporary folder (files an example writes are there for the next):

* ```python blocks run in one namespace; a block with ``>>>`` prompts runs as a doctest (outputs
  compared); a block defining ``test_*`` functions is also run by pytester and must pass.
* ```bash/```console/```sh lines ``equivcheck ...`` (``$ `` prompt and ``python -m equivcheck``
  too) run through ``equivcheck.cli.main`` and must exit 0, or the ``<!-- exit: N -->`` status
  written before the block. ``make``/``pip`` lines are not run. The commands run in this process,
  not in a subprocess: each would import TensorFlow and torch afresh (about 8 s on 2 cores), and
  the entry point itself is covered by tests/test_cli.py.

``<!-- not run: REASON -->`` before a block leaves it out. Old (deprecated) spellings fail.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "console", "sh", "shell"}
FENCE = re.compile(r"^```\s*([\w-]*)\s*$")
MARK = re.compile(r"^<!--\s*(not run|exit|slow)\s*:?\s*(.*?)\s*-->$")
NAMESPACE = "equivcheck_docs"   # the examples' module name



@dataclass
class Example:
    path: Path
    line: int                      # line of the opening fence
    lang: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.lang in SHELL:
            return "shell"
        if re.search(r"^\s*>>> ", self.text, re.M):
            return "doctest"
        if re.search(r"^def test_\w*\(.*\bequivcheck\b", self.text, re.M):
            return "pytest"
        return "python"


def parse(path: Path) -> list[Example]:
    """The fenced python and shell blocks of one Markdown file, with the marks written just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    examples, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        lang, marks, k = fence.group(1).lower(), {}, i - 1
        while k >= 0 and (not lines[k].strip() or lines[k].startswith("<!--")):
            mark = MARK.match(lines[k].strip())
            if mark:
                marks[mark.group(1)] = mark.group(2)
            k -= 1
        if lang == "python" or lang in SHELL:
            examples.append(Example(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", marks))
        i = end + 1
    return examples


def commands(text: str) -> list[tuple[list[str], int | None]]:
    """The ``equivcheck`` command lines of a shell block: argv after ``equivcheck``, and the exit
    status a trailing ``# exit N`` comment gives it (else None)."""
    out, joined = [], text.replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.strip().removeprefix("$ ").strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        if argv[0] in ("make", "pip"):
            continue
        if argv[:3] in (["python", "-m", "equivcheck"], [".venv/bin/python", "-m", "equivcheck"]):
            argv = argv[2:]
        if argv[0] != "equivcheck":
            raise AssertionError(f"cannot run this docs line (not equivcheck, make or pip): {line}")
        said = re.search(r"#\s*exit\s+(\d+)", line)
        out.append((argv[1:], int(said.group(1)) if said else None))
    return out


def runnable(example: Example) -> bool:
    return example.lang == "python" or bool(commands(example.text))


PARSED = [e for path in DOC_FILES for e in parse(path)]
EXAMPLES = [e for e in PARSED if "not run" not in e.marks and runnable(e)]


@contextlib.contextmanager
def in_folder(folder: Path):
    """cwd = ``folder`` and the old spellings as errors; sys.path and modules the example adds undone after."""
    cwd, path, modules = os.getcwd(), list(sys.path), set(sys.modules)
    os.chdir(folder)
    try:
        with warnings.catch_warnings():
            # equivcheck's renamed keywords (the warning points at the example) and its own deprecations
            warnings.filterwarnings("error", r"\w+= is deprecated", DeprecationWarning)
            warnings.filterwarnings("error", category=DeprecationWarning, module=r"equivcheck(\.|\Z)")
            yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if getattr(sys.modules[name], "__file__", None) and str(folder) in str(sys.modules[name].__file__):
                del sys.modules[name]


class Outcomes:
    """A pytest plugin counting the test outcomes of a nested run."""

    def __init__(self) -> None:
        self.passed = self.failed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed += 1


class DocRun:
    """One Markdown file's examples run in order, each once, in one namespace and one folder."""

    def __init__(self, path: Path, folder: Path, examples: list[Example] | None = None) -> None:
        self.examples = [e for e in EXAMPLES if e.path == path] if examples is None else examples
        self.folder = folder
        self.namespace: dict[str, Any] = {"__name__": NAMESPACE}
        self.results: dict[int, BaseException | None] = {}

    def result(self, example: Example, request: pytest.FixtureRequest) -> BaseException | None:
        for earlier in self.examples:
            if earlier.line not in self.results:
                self.results[earlier.line] = self._run(earlier, request)
            if earlier is example:
                return self.results[earlier.line]
        raise AssertionError(f"{example.id} not collected")

    def _run(self, example: Example, request: pytest.FixtureRequest) -> BaseException | None:
        try:
            with in_folder(self.folder):
                getattr(self, f"_{example.kind}")(example, request)
        except (Exception, SystemExit) as exc:   # reported by the example's own test
            return exc
        return None

    def _python(self, example: Example, request: pytest.FixtureRequest) -> None:
        code = compile("\n" * example.line + example.text, str(example.path), "exec")
        exec(code, self.namespace)

    def _doctest(self, example: Example, request: pytest.FixtureRequest) -> None:
        test = doctest.DocTestParser().get_doctest(example.text, self.namespace, example.id, str(example.path),
                                                   example.line)
        report = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=report.write, clear_globs=False)
        self.namespace.update(test.globs)   # DocTest works on a copy: the file's later examples see its names
        if runner.failures:
            raise AssertionError(report.getvalue())

    def _pytest(self, example: Example, request: pytest.FixtureRequest) -> None:
        self._python(example, request)   # its helpers are there for the file's later examples
        tests = len(re.findall(r"^def test_", example.text, re.M))
        folder = self.folder / f"pytest_{example.line}"
        folder.mkdir()
        (folder / "test_docs_example.py").write_text(example.text, encoding="utf-8")
        os.chdir(folder)
        outcomes = Outcomes()
        # pytest.main, not pytester: pytester's teardown drops the modules imported meanwhile, and
        # TensorFlow aborts the process when imported a second time.
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = pytest.main(["-p", "no:cacheprovider", "-p", "no:randomly", "-W", "error::DeprecationWarning",
                                "--rootdir", str(folder), "-c", os.devnull, str(folder)], plugins=[outcomes])
        if code != 0 or outcomes.passed != tests or outcomes.failed:
            raise AssertionError(f"expected {tests} passed, got {outcomes.passed} passed, {outcomes.failed} failed "
                                 f"(exit {code})\n{out.getvalue()[-4000:]}")

    def _shell(self, example: Example, request: pytest.FixtureRequest) -> None:
        from equivcheck.cli import main

        block = int(example.marks.get("exit") or 0)
        codes = []
        for argv, said in commands(example.text):
            expected = block if said is None else said
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:   # argparse's usage errors
                    code = exc.code if isinstance(exc.code, int) else 2
            codes.append(code)
            if code != expected and (said is not None or expected == 0 or code != 0):
                raise AssertionError(f"equivcheck {shlex.join(argv)} exited {code}, the docs say {expected}\n"
                                     f"stdout:\n{out.getvalue()[-3000:]}\nstderr:\n{err.getvalue()[-3000:]}")
        if block and block not in codes:
            raise AssertionError(f"no command exited {block} as the docs say: exit codes {codes}")


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, DocRun]:
    return {path: DocRun(path, tmp_path_factory.mktemp(path.stem)) for path in DOC_FILES}


def test_examples_are_collected() -> None:
    """The parser finds the docs' examples (an empty list would make every other test vacuous)."""
    assert len(EXAMPLES) >= 10
    assert {e.path.name for e in EXAMPLES} >= {"README.md", "getting-started.md", "explore.md"}


def test_not_run_marks_give_a_reason() -> None:
    for example in PARSED:
        if "not run" in example.marks:
            assert example.marks["not run"], f"{example.id}: <!-- not run: REASON --> needs its reason"


def test_marks_parse_from_markdown(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("<!-- exit: 1 -->\n\n```console\n$ equivcheck plan \\\n  --units 3  # why\nmake demo\n```\n"
                   "<!-- not run: a signature -->\n```python\nf(x, ...)\n```\n```text\nequivcheck no\n```\n")
    shell, python = parse(doc)
    assert (shell.line, shell.kind, shell.marks) == (3, "shell", {"exit": "1"})
    assert commands(shell.text) == [(["plan", "--units", "3"], None)]
    assert commands("equivcheck x  # exit 2: why\n") == [(["x"], 2)]
    assert (python.kind, python.marks) == ("python", {"not run": "a signature"})


def test_old_spellings_and_wrong_exit_codes_fail(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    doc = tmp_path / "old.md"
    doc.write_text("```python\nimport equivcheck as ec\nd = ec.spec('keras:dense', channels=2, spatial=(2, 2), "
                   "units=2)\nec.verify_pair(d, d, mutations=False)\n```\n```bash\nequivcheck presets  # exit 1\n```\n")
    run = DocRun(doc, tmp_path, parse(doc))
    deprecated, exit_code = (run.result(e, request) for e in run.examples)
    assert isinstance(deprecated, DeprecationWarning) and "mutations=" in str(deprecated)
    assert isinstance(exit_code, AssertionError) and "exited 0, the docs say 1" in str(exit_code)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_doc_example(example: Example, doc_runs: dict[Path, DocRun], request: pytest.FixtureRequest) -> None:
    error = doc_runs[example.path].result(example, request)
    if error is not None:
        raise error

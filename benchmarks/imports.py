"""Cost of ``import equivcheck`` and of loading its pytest plugin, against bare ``python -c pass``.

Each is a fresh interpreter, best of N runs; printed as seconds and as a ratio to the bare start.
``--suite`` also times the whole test suite once (minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STATEMENTS = {
    "python -c pass (baseline)": "pass",
    "import numpy": "import numpy",
    "import equivcheck": "import equivcheck",
    "import equivcheck.plugin": "import equivcheck.plugin",
    "import torch (for scale)": "import torch",
}


def best(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return min(times)


def rows(repeat: int = 5, suite: bool = False) -> list[tuple[str, float, float]]:
    out = []
    base = None
    for name, stmt in STATEMENTS.items():
        seconds = best([sys.executable, "-c", stmt], repeat)
        base = base or seconds
        out.append((name, seconds, seconds / base))
    with tempfile.TemporaryDirectory() as folder:  # one trivial test: the plugin's own cost, nothing of the suite's
        Path(folder, "test_one.py").write_text("def test_one():\n    pass\n")
        collect = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "--rootdir", folder, folder]
        plugin = best(collect, max(repeat, 3))
        no_plugin = best([*collect, "-p", "no:equivcheck"], max(repeat, 3))
    seconds = dict((n, s) for n, s, _ in out)
    out.append(("import equivcheck against import numpy (target ≤ 1.3)", seconds["import equivcheck"],
                seconds["import equivcheck"] / seconds["import numpy"]))
    out.append((f"pytest --co with the plugin (target: < 0.05 s more; here {plugin - no_plugin:+.3f} s)", plugin,
                plugin / no_plugin))
    out.append(("pytest --co with -p no:equivcheck (baseline for the row above)", no_plugin, 1.0))
    if suite:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True)
        out.append(("whole test suite (make test: pytest -n 2)", time.perf_counter() - start, float("nan")))
    return out


def render(table: list[tuple[str, float, float]], markdown: bool = False) -> str:
    if markdown:
        return "\n".join(["| what | seconds | ratio |", "|---|---:|---:|"] +
                         [f"| {n} | {s:.3f} | {r:.2f} |" for n, s, r in table])
    return "\n".join(f"{n:65s} {s:8.3f} s {r:6.2f}×" for n, s, r in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--suite", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(render(rows(args.repeat, args.suite), args.markdown))


if __name__ == "__main__":
    main()

"""``make bench``: every benchmark, each figure against its baseline measured in the same run.

Writes ``reports/benchmarks.md`` (atomically) with the machine, Python and framework versions,
and prints the same tables. ``--quick`` uses fewer repeats and trials (for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# (module, title, keyword arguments for rows() in full and quick mode)
SECTIONS = [
    ("mapping", "Mapping VGG16 fc6 (25088×4096 float32, flip included)", {"repeat": 3}, {"repeat": 1}),
    ("explore", "Explorer: forward calls and seconds, against brute force over named conventions", {}, {"quick": True}),
    ("harness", "Harness overhead per generated case, against the bare forward passes", {"cases": 40}, {"cases": 5}),
    ("imports", "Import and plugin cost", {"repeat": 5, "suite": True}, {"repeat": 2}),
    ("comparator", "Comparator sensitivity at fan-in 25088", {"trials": 1000}, {"trials": 100}),
    ("soundness", "Soundness per layer kind and dtype (probed facts), natively and as an older CPU",
     {"trials": 300}, {"trials": 30, "older_cpu": False}),
    ("runtimes", "ONNX Runtime / TFLite per-case overhead", {"repeat": 20}, {"repeat": 3}),
    ("modelcheck", "Whole-model check: converted VGG16 layer by layer against one forward pass of both",
     {"repeat": 3}, {"quick": True, "repeat": 1}),
]


def versions() -> str:
    from importlib import metadata

    parts = [f"Python {platform.python_version()}", f"{platform.machine()} × {__import__('os').cpu_count()} cores",
             platform.platform(terse=True)]
    for dist in ("numpy", "torch", "tensorflow-cpu", "keras", "jax", "scipy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    return " · ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated section names")
    parser.add_argument("--out", default=str(HERE.parent / "reports" / "benchmarks.md"))
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    out = ["# equivcheck benchmarks", "", versions(), "",
           f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}{' (quick)' if args.quick else ''}. "
           "Every ratio compares methods measured side by side in this run.", ""]
    for name, title, full, quick in SECTIONS:
        if only and name not in only:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            print(f"skipping {name}: {exc}")
            continue
        print(f"\n== {title}")
        start = time.perf_counter()
        table = module.rows(**(quick if args.quick else full))
        print(module.render(table))
        out += [f"## {title}", "", module.render(table, markdown=True), "",
                f"_{time.perf_counter() - start:.1f} s_", ""]
    from equivcheck.files import atomic_write_text

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(out))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

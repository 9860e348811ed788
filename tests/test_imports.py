"""Importing equivcheck (or its plugin) loads no deep-learning framework: checked in a fresh process."""

import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "scipy", "matplotlib", "onnx", "onnxruntime", "ai_edge_litert")


@pytest.mark.parametrize(
    "statement",
    [
        "import equivcheck",
        "import equivcheck.plugin",
        "import equivcheck as ec; ec.plan(ec.spec('keras:dense', channels=2, spatial=(3,), units=2), ec.spec('torch:conv', channels=2, spatial=(3,), units=2))",
        "import equivcheck.cli; equivcheck.cli.build_parser()",
    ],
)
def test_no_framework_is_imported(statement):
    code = f"{statement}\nimport sys\nprint(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`{statement}` imported: {out}"

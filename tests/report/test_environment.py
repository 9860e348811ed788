"""environment(): versions without importing frameworks; precision settings of those already imported."""

import importlib.util
import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
{setup}
from equivcheck.report import environment
env = environment(seed=7)
print(json.dumps({{"env": env, "loaded": sorted(m for m in ("torch", "tensorflow", "keras", "jax", "matplotlib")
                                              if m in sys.modules)}}))
"""


def _probe(setup: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_environment_imports_no_framework_yet_reports_installed_versions():
    result = _probe()
    assert result["loaded"] == []
    env = result["env"]
    assert env["seed"] == 7 and env["python"] == ".".join(map(str, sys.version_info[:3]))
    for name, info in env["frameworks"].items():
        assert info["imported"] is False
        installed = importlib.util.find_spec(name) is not None
        assert (info["version"] is not None) == installed, name
    assert "torch" not in env["precision"]


def test_environment_reads_torch_precision_once_torch_is_imported():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed: pip install 'equivcheck[torch]'")
    env = _probe("import torch; torch.set_float32_matmul_precision('high')")["env"]
    assert env["frameworks"]["torch"]["imported"] is True
    assert env["precision"]["torch"]["float32_matmul_precision"] == "high"
    assert isinstance(env["precision"]["torch"]["cuda_matmul_allow_tf32"], bool)


def test_environment_names_onnxruntimes_execution_provider_once_it_runs():
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: pip install 'equivcheck[onnx]'")
    env = _probe("import onnxruntime")["env"]
    assert env["frameworks"]["onnxruntime"]["version"]
    assert env["precision"]["onnxruntime"]["execution_provider"] == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in env["precision"]["onnxruntime"]["available_providers"]

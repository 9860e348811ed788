"""The backend registry: names, lazy imports, versions, and what happens when a framework is missing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck.backends.base import Backend
from equivcheck.verification import verify_pair

from ._support import BACKEND_NAMES, MODULES, require

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "scipy.signal")


def test_registry_names_every_backend():
    assert tuple(backends.BACKENDS) == BACKEND_NAMES
    for name in BACKEND_NAMES:
        backend = backends.get(name)
        assert isinstance(backend, Backend) and backend.name == name


def test_getting_and_asking_backends_imports_no_framework():
    code = (
        "import sys, equivcheck as ec\n"
        "from equivcheck import backends\n"
        "s = ec.spec('keras:conv', channels=2, spatial=(3, 3), units=2)\n"
        "for n in backends.BACKENDS:\n"
        "    b = backends.get(n); b.available(); b.unsupported(s, 'float16')\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"asking the backends imported {out}: frameworks must load on first build only"


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_version_is_the_frameworks(name):
    backend = require(name)
    module = importlib.import_module(MODULES[name][-1])
    assert backend.version().startswith(module.__version__), f"{name}.version() is not {module.__name__}.__version__"


def test_keras_version_names_tensorflow(keras):
    import tensorflow as tf

    assert backends.get("keras").version() == f"{keras.__version__} (tensorflow {tf.__version__})"


class GhostBackend(Backend):
    name = "ghost"
    module = "equivcheck_no_such_framework"

    def build(self, spec, dtype="float32"):
        self.load()  # as every backend does first: raises BackendUnavailable here


def test_missing_framework_makes_verify_skip(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "ghost", f"{__name__}:GhostBackend")
    backends.get.cache_clear()
    try:
        assert not backends.get("ghost").available()
        with pytest.raises(ec.BackendUnavailable, match="equivcheck_no_such_framework"):
            backends.get("ghost").load()
        spec = ec.spec("torch:conv", channels=2, spatial=(3, 3), units=2)
        case = verify_pair(spec, spec, source_backend="numpy", target_backend="ghost")
        assert case.verdict == "skip" and "equivcheck_no_such_framework" in case.reason
    finally:
        backends.get.cache_clear()


def test_keras_on_another_backend_is_unavailable():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    code = (
        "import equivcheck as ec\n"
        "from equivcheck import backends\n"
        "from equivcheck.verification import verify_pair\n"
        "s = ec.spec('keras:conv', channels=2, spatial=(3, 3), units=2)\n"
        "c = verify_pair(s, s, source_backend='numpy', target_backend='keras')\n"
        "print(backends.get('keras').available(), c.verdict)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "skip"], "with KERAS_BACKEND=jax the keras backend (Keras on TensorFlow) must not claim to run"


def test_cli_lists_versions(capsys):
    from equivcheck.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in BACKEND_NAMES:
        assert name in out
    import numpy

    assert numpy.__version__ in out

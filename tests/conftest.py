"""Shared fixtures: each framework imported once per session, skipping with a reason when absent."""

import os

import ml_dtypes  # noqa: F401
import numpy  # noqa: F401
import pytest

import equivcheck.checker
import equivcheck.judge
import equivcheck.report  # noqa: F401

# `import equivcheck` and its plugin are lazy, so the first in-process pytester run would import the
# rest, and pytester drops what a run imported: a C extension (numpy, ml_dtypes) cannot load twice, and
# a re-imported equivcheck module would hold classes that the kept ones (lru_caches) do not recognise.

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture(scope="session")
def tf():
    return pytest.importorskip("tensorflow", reason="tensorflow not installed: pip install 'equivcheck[tensorflow]'")


@pytest.fixture(scope="session")
def keras(tf):
    return pytest.importorskip("keras", reason="keras not installed: pip install 'equivcheck[tensorflow]'")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch", reason="torch not installed: pip install 'equivcheck[torch]'")


@pytest.fixture(scope="session")
def jax():
    return pytest.importorskip("jax", reason="jax not installed: pip install 'equivcheck[jax]'")

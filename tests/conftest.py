"""Shared fixtures: each framework imported once per session, skipping with a reason when absent."""

import os

import pytest

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

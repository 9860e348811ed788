"""Fixtures for whole-model tests: the frameworks (imported once per process) and tiny models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def keras():
    return pytest.importorskip("keras", reason="Keras 3 is needed for the Keras model tests")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch", reason="torch is needed for the torch model tests")

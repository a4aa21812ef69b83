"""The kvpress tests run in their own environment (.venv-kvpress: kvpress needs transformers < 5.3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from forward_influence.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def loaded():
    return load_model()

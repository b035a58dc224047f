"""Shared fixtures: a fresh tiny config per test, with its own store and MLflow database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def tiny(tmp_path):
    """(config path, overrides) for the tiny config, writing into tmp_path."""
    def make(*extra: str) -> list[str]:
        return [f"store.root={tmp_path / 'store'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return str(TINY), make

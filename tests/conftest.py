"""Shared fixtures: a fresh tiny config per test, with its own store and MLflow database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dalle")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

NO_CUDA = "needs a CUDA device and this machine has none; run `pytest -m gpu` on a GPU machine"
# A device parameter: "cpu" always, "cuda" as a `gpu`-marked case that is skipped (saying why) without CUDA.
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])
DEVICES = ["cpu", CUDA]


@pytest.fixture
def tiny(tmp_path):
    """(config path, overrides) for the tiny config, writing into tmp_path."""
    def make(*extra: str) -> list[str]:
        return [f"store.root={tmp_path / 'store'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return str(TINY), make


@pytest.fixture(scope="session")
def openmoji_subset(tmp_path_factory):
    """(folder, build summary): a small OpenMoji imagefolder (40 concepts at 64 px) built by the real build."""
    from data_sources.openmoji import BuildOptions, build

    out = tmp_path_factory.mktemp("openmoji") / "openmoji-64"
    opts = BuildOptions(size=64, limit=40, val_fraction=0.2, variant_fraction=1.0)
    return out, opts, build(str(out), opts)


def run_stage(stage: str, overrides: list[str], config: str | os.PathLike = TINY, **kwargs):
    """The pipeline flow run up to `stage` (as `dalle <stage command>` runs it) under `config` + `overrides`;
    returns that stage's ArtifactRef. `kwargs` go to the flow (only=, from_stage=, force=)."""
    from flows.pipeline_flow import pipeline_flow
    from pipeline.config import load_config

    if not kwargs:
        kwargs = {"until": stage}
    return pipeline_flow(load_config(config, overrides), **kwargs)[stage]

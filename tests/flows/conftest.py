import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(autouse=True, scope="session")
def prefect_backend():
    """One temporary Prefect server (SQLite) for the whole test session."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pretokenized(tmp_path_factory, prefect_backend):
    """A store holding a finished tiny ingest -> dVAE -> BPE -> tokens run (shared, do not modify)."""
    from tests.conftest import run_stage

    tmp = tmp_path_factory.mktemp("pretokenized")
    ov = [f"store.root={tmp / 'store'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    ref = run_stage("pretokenize", ov)
    return tmp, ov, ref


@pytest.fixture
def store_copy(pretokenized, tmp_path):
    """Overrides for a private copy of the pretokenized store, with its own MLflow database."""
    import shutil

    src, _, _ = pretokenized
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.fixture(scope="session")
def generated(pretokenized, tmp_path_factory):
    """A tiny store with every stage through generation done (shared, do not modify)."""
    import shutil

    from tests.conftest import run_stage

    src, _, _ = pretokenized
    tmp = tmp_path_factory.mktemp("generated")
    shutil.copytree(src / "store", tmp / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    ov = [f"store.root={tmp / 'store'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
          "clip.train.max_steps=60", "clip.train.checkpoint_every=30"]
    ref = run_stage("generate", ov)
    return tmp, ov, ref

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(autouse=True, scope="session")
def prefect_backend():
    """One temporary Prefect server (SQLite) for the whole test session."""
    with prefect_test_harness(server_startup_timeout=120):
        yield

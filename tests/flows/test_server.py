"""The command's own Prefect server: how long it is waited for, and the one line when it does not come up."""

import os

import psutil
import pytest

from cli import prefect_server as server
from cli.prefect_server import PrefectServerError, start_server


def test_the_start_is_waited_for_minutes_unless_the_setting_asks_more(monkeypatch):
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    waits = []
    monkeypatch.setattr(server, "_start", lambda timeout_s, home: waits.append(timeout_s) or "url")
    start_server()  # Prefect's default setting (20 s) is too short for a busy machine
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 1800}):
        start_server()
    assert waits == [600, 1800]


def test_a_server_that_does_not_answer_in_time_is_one_line_naming_the_setting():
    with pytest.raises(PrefectServerError, match=r"^the embedded Prefect server \(PREFECT_HOME='[^']+'\) did not "
                       r"answer within 1 s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS \(seconds\), or "
                       r"set PREFECT_API_URL to a running Prefect server$"):
        start_server(timeout_s=1)
    assert not [c for c in psutil.Process().children() if "cli.prefect_server" in c.cmdline()], "left running"


def test_a_start_waits_while_another_command_starts_a_server_in_the_same_prefect_home():
    from filelock import FileLock
    from prefect.settings import PREFECT_HOME

    with FileLock(os.path.join(str(PREFECT_HOME.value()), server.START_LOCK)):  # two first starts broke the db
        with pytest.raises(PrefectServerError, match=r"^another command has been starting a Prefect server with "
                           r"PREFECT_HOME='[^']+' for over 1 s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
            start_server(timeout_s=1)

"""Tracking across processes: the first creation of the sqlite store, and the runs of killed processes."""

import os
import signal
import socket
import subprocess
import sys

import psutil

from storage import tracking
from storage.store import ArtifactStore

# Imports MLflow, then waits for a line so that it creates the fresh database at the same moment as the test.
CHILD = """
import sys
from mlflow import MlflowClient
from storage.store import ArtifactStore
from storage.tracking import StageRun
print("ready", flush=True)
sys.stdin.readline()
print(StageRun(sys.argv[1], "race", ArtifactStore(sys.argv[2]), "stage", stage="dvae").run_id, flush=True)
sys.stdin.readline()
"""


def test_runs_started_at_once_on_a_fresh_store_and_killed_runs_are_ended(tmp_path, monkeypatch):
    uri, store = f"sqlite:///{tmp_path}/mlflow.db", ArtifactStore(str(tmp_path / "store"))
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, store.root], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from mlflow import MlflowClient  # noqa: F401  (imported while the child imports it)

        assert child.stdout.readline() == "ready\n", child.stderr.read()
        child.stdin.write("go\n")
        child.stdin.flush()
        live_run = tracking.StageRun(uri, "race", store, "this process").run_id
        killed_run = child.stdout.readline().strip()
        assert killed_run, child.stderr.read()[-3000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        client = tracking._client(uri)
        exp = client.get_run(live_run).info.experiment_id
        me, host = psutil.Process(), socket.gethostname()
        reused_pid = client.create_run(exp, tags={"host": host, "pid": str(me.pid),
                                                  "process_start": f"{me.create_time() - 3600:.2f}"}).info.run_id
        other_host = client.create_run(exp, tags={"host": f"not-{host}", "pid": str(child.pid),
                                                  "process_start": "0"}).info.run_id

        monkeypatch.setattr(tracking, "_swept", set())  # as in the next command
        tracking.experiment_id(uri, "race", store)
        status = {r: client.get_run(r).info.status for r in (killed_run, live_run, reused_pid, other_host)}
        assert status == {killed_run: "KILLED", live_run: "RUNNING", reused_pid: "KILLED", other_host: "RUNNING"}
        assert client.get_run(killed_run).data.tags["end_reason"] == f"process {child.pid} on {host} is gone"
        assert client.get_run(killed_run).info.end_time is not None
    finally:
        child.kill()
        child.wait()

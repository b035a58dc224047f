"""Helpers for tests that start real servers (Prefect, MLflow) as subprocesses and talk to them over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli.prefect_server import free_port  # noqa: F401 (the tests' import of it)
from serve import app_server  # noqa: F401 (the tests' import of it)

BIN = Path(sys.executable).parent


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def get_json(url: str, payload: dict | None = None) -> dict:
    """GET `url` (POST `payload` as JSON when given) and parse the JSON answer."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode() if payload is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def copy_store(src_root: Path, dst: Path) -> list[str]:
    """Overrides for a private copy of `src_root/store` under `dst`, with its own MLflow database."""
    shutil.copytree(src_root / "store", dst / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return [f"store.root={dst / 'store'}", f"tracking.uri=sqlite:///{dst / 'mlflow.db'}"]

"""The Prefect API of one `dalle` command: the configured server, or the command's own embedded server, which
is given the minutes a busy machine needs to start it and ends with the command, even under kill -9."""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from dalle_core.errors import ConfigError

TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
MIN_STARTUP_S = 600.0  # Prefect's default of 20 s is far too short on a busy small machine
START_LOCK = "server-start.lock"  # in PREFECT_HOME: one server start at a time creates its database
PORT_TAKEN = 3  # uvicorn's exit status when its port was taken before it could bind


class PrefectServerError(ConfigError):
    """The Prefect server cannot be reached or started; one line naming the setting or URL that fixes it."""


def ensure_prefect_api() -> str:
    """The URL of the Prefect API this command reports to. A configured PREFECT_API_URL (environment or Prefect
    profile) must answer; without one, this command's own server is started (`start_server`) and this process
    and its children are pointed at it. Raises PrefectServerError (one line)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if url:
        try:
            _health(url, timeout=5)
        except OSError as err:
            raise PrefectServerError(f"Prefect server at PREFECT_API_URL={url!r} is unreachable: "
                                     f"{getattr(err, 'reason', err)}") from None
        return url
    url = start_server()
    os.environ["PREFECT_API_URL"] = url  # also for the workers this command starts
    refresh_global_settings_context()  # Prefect read its settings when first imported
    return url


def start_server(timeout_s: float | None = None) -> str:
    """Start a Prefect server on a free local port for this process and return its API URL once it answers.

    The server runs in its own session, so a terminal's Ctrl-C reaches the command and not the server (whose
    Prefect API the command still needs while it stops). The server stops when this process exits, and also when it is killed (SIGKILL included): it watches a pipe
    from this process and shuts down when the pipe closes. Starts are serialized per PREFECT_HOME because the
    server creates and migrates its SQLite database on start. `timeout_s` defaults to
    max(600, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Raises PrefectServerError (one line) when the
    server exits or does not answer in time.
    """
    from filelock import FileLock, Timeout
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if timeout_s is None:
        timeout_s = max(MIN_STARTUP_S, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    home = str(PREFECT_HOME.value())
    os.makedirs(home, exist_ok=True)
    try:
        with FileLock(os.path.join(home, START_LOCK), timeout=timeout_s):
            return _start(timeout_s, home)
    except Timeout:
        raise PrefectServerError(f"another command has been starting a Prefect server with PREFECT_HOME={home!r} "
                                 f"for over {timeout_s:.0f} s; raise {TIMEOUT_SETTING} (seconds) or set "
                                 "PREFECT_API_URL to a running Prefect server") from None


def _start(timeout_s: float, home: str) -> str:
    log = tempfile.TemporaryFile()
    deadline = time.monotonic() + timeout_s
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    while True:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        proc = subprocess.Popen([sys.executable, "-m", "cli.prefect_server", str(port)], stdin=subprocess.PIPE,
                                stdout=log, stderr=log, env=env, start_new_session=True)
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                _health(url, timeout=10)
            except OSError:
                time.sleep(0.25)
                continue
            atexit.register(_stop, proc)  # also keeps `proc`, whose stdin must stay open, referenced until exit
            return url
        if proc.poll() != PORT_TAKEN or time.monotonic() >= deadline:
            break
    if proc.poll() is None:
        _stop(proc)
        raise PrefectServerError(f"the embedded Prefect server (PREFECT_HOME={home!r}) did not answer within "
                                 f"{timeout_s:.0f} s; raise {TIMEOUT_SETTING} (seconds), or set PREFECT_API_URL "
                                 "to a running Prefect server")
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", line)),
               lines[-1] if lines else "(no output)")
    raise PrefectServerError(f"the embedded Prefect server (PREFECT_HOME={home!r}) exited with status "
                             f"{proc.returncode} while starting: {why[:300]}")


def _health(url: str, timeout: float) -> None:
    """Return if the API at `url` answers at all; OSError if it does not."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(port: int) -> None:
    """The server process: the Prefect API on 127.0.0.1:`port` until stdin closes, i.e. until the process that
    started it is gone, however it ended."""
    import uvicorn

    def exit_with_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent is gone, and the kernel closed its end
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

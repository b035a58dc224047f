"""Two runs on one store: a stage key is computed at most once, in real processes (no Prefect: the claim is
the store's, taken by `ArtifactStore.begin` as every stage's `pipeline.artifacts.run_stage` does)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from storage.store import ArtifactStore

# A fake stage body: claim or reuse dvae/k; when claimed, note the run, "train" for `hold` seconds, finish.
STAGE = """
import os, sys, time
from storage.store import ArtifactStore
root, kind, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = ArtifactStore(root)
if kind == "heartbeat":  # the object-store claim, on a local disk
    store.claim_options = {"os_lock": False, "heartbeat_s": 0.2, "expire_s": 1.5}
if store.begin("dvae", "k", log=lambda m: print(m, flush=True)) is not None:
    print("reused", flush=True)
    sys.exit(0)
print("claimed", flush=True)
with open(os.path.join(root, "runs.txt"), "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(hold)
store.write_bytes(store.path("dvae", "k", "model.safetensors"), str(os.getpid()).encode())
store.finish("dvae", "k", config={}, inputs={})
print("finished", flush=True)
"""


def _start(root, kind: str, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE, str(root), kind, str(hold)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 30.0) -> list[str]:
    """Lines the process printed up to and including the first one containing `word`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if word in line:
            return lines
    raise AssertionError(f"no {word!r} from pid {proc.pid}; it printed {lines}")


def _runs(root) -> list[str]:
    path = os.path.join(root, "runs.txt")
    return open(path).read().split() if os.path.exists(path) else []


@pytest.mark.parametrize("kind", ["os-lock", "heartbeat"])
def test_second_run_waits_for_the_first_then_reuses(tmp_path, kind):
    first = _start(tmp_path, kind, 1.5)
    _wait_for(first, "claimed")
    second = _start(tmp_path, kind, 0.0)
    waiting = _wait_for(second, "waiting for dvae/k")
    assert f"claimed by pid {first.pid} on " in waiting[-1]
    assert _wait_for(second, "reused") and second.wait(30) == 0
    assert _wait_for(first, "finished") and first.wait(30) == 0
    assert _runs(tmp_path) == [str(first.pid)]  # computed once
    assert ArtifactStore(str(tmp_path)).read_bytes(str(tmp_path / "dvae/k/model.safetensors")) == \
        str(first.pid).encode()


def test_run_after_the_first_finished_reuses_without_waiting(tmp_path):
    first = _start(tmp_path, "os-lock", 0.0)
    assert first.wait(30) == 0
    second = _start(tmp_path, "os-lock", 0.0)
    out, _ = second.communicate(timeout=30)
    assert out.split() == ["reused"]
    assert _runs(tmp_path) == [str(first.pid)]


@pytest.mark.parametrize("kind", ["os-lock", "heartbeat"])
def test_dead_owners_claim_is_taken_over(tmp_path, kind):
    first = _start(tmp_path, kind, 60.0)
    _wait_for(first, "claimed")
    second = _start(tmp_path, kind, 0.0)
    _wait_for(second, "waiting for dvae/k")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert _wait_for(second, "finished") and second.wait(30) == 0
    assert _runs(tmp_path) == [str(first.pid), str(second.pid)]
    store = ArtifactStore(str(tmp_path))
    assert store.is_complete("dvae", "k") and store.claimed_by("dvae", "k") is None

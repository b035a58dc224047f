"""MLflow tracking helpers: one run per stage execution, nested under a pipeline run.

Runs are driven through an explicit `MlflowClient` and run ids rather than
mlflow's thread-local "active run", because Prefect runs tasks in worker
threads (or other processes) where that global state does not follow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.store import ArtifactStore

EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's tag for a model-training experiment


class TrackingError(RuntimeError):
    """MLflow cannot be reached or used; one line naming the URI."""


def tracking_uri(configured: str | None, store: ArtifactStore) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite beside a local store."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = store.root if store.local else os.path.abspath("./mlruns")
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{base}/mlflow.db"


def has_runs(uri: str, experiment: str) -> bool:
    """Whether the tracking store at `uri` holds any run of `experiment` (a missing sqlite file holds none)."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return False
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return exp is not None and bool(client.search_runs([exp.experiment_id], max_results=1))


def check_experiment(uri: str, name: str) -> None:
    """TrackingError (one line, with the remedies) when experiment `name` at `uri` was deleted (in the UI or with
    `mlflow experiments delete`); reads only (a missing sqlite file holds none)."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return
    exp = _client(uri).get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(_deleted(name, exp.experiment_id, uri))


def _deleted(name: str, experiment_id: str, uri: str) -> str:
    return (f"MLflow experiment {name!r} (id {experiment_id}) at {uri!r} is deleted; restore it (`MLFLOW_TRACKING_URI="
            f"{uri} mlflow experiments restore --experiment-id {experiment_id}`, or the UI's trash) or set "
            "tracking.experiment to another name")


def _artifact_location(uri: str, store: ArtifactStore) -> str | None:
    """Where a new experiment keeps its artifacts: in a local store, else beside the sqlite database (never
    MLflow's default ./mlruns of whatever folder the process runs in); servers pick their own."""
    if not uri.startswith("sqlite:///"):
        return None
    if store.local:
        return os.path.join(store.root, "mlartifacts")
    return os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), "mlartifacts")


def _client(uri: str):
    from mlflow import MlflowClient

    db = uri.removeprefix("sqlite:///")
    if db == uri or db.startswith(":memory:"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    # the client creates and migrates the database on first use: a second process doing it at once fails
    with FileLock(f"{db}.lock"):
        return MlflowClient(tracking_uri=uri)


def _probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an HTTP tracking server that does not answer (the client would retry for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; a server without /health is still a server
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking at {uri!r} is unreachable: {reason}") from None


_swept: set[tuple[str, str]] = set()  # (uri, experiment id) whose orphaned runs this process has ended


def experiment_id(uri: str, name: str, store: ArtifactStore) -> str:
    """The id of experiment `name` at `uri`, created if missing. The first call per experiment in a process
    also ends the runs left RUNNING by killed processes (`end_orphaned_runs`). Raises TrackingError."""
    if uri.startswith(("http://", "https://")):
        _probe(uri)
    client = _client(uri)
    try:
        exp_id = _get_or_create_experiment(client, uri, name, store)
        if (uri, exp_id) not in _swept:
            end_orphaned_runs(client, exp_id)
            _swept.add((uri, exp_id))
        return exp_id
    except TrackingError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrackingError(f"MLflow tracking at {uri!r} is unreachable or unusable: {first}") from None


def _get_or_create_experiment(client, uri: str, name: str, store: ArtifactStore) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":  # MLflow keeps its name taken until it is purged
        raise TrackingError(_deleted(name, exp.experiment_id, uri))
    if exp is not None:
        if "mlflow.experimentKind" not in exp.tags:  # made by an older version, or by hand
            client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        # a training experiment: MLflow 3 would otherwise open it in its GenAI view ("Evaluations")
        return client.create_experiment(name, artifact_location=_artifact_location(uri, store),
                                        tags={"mlflow.experimentKind": EXPERIMENT_KIND})
    except Exception:  # created meanwhile by a parallel task
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def process_tags() -> dict[str, str]:
    """Tags naming the process that owns a run and will end it: `host`, `pid` and `process_start` (unix
    seconds, which tells a reused pid apart)."""
    import psutil

    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": str(me.pid), "process_start": f"{me.create_time():.2f}"}


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; whose it is cannot be told


def end_orphaned_runs(client, exp_id: str) -> list[str]:
    """End as KILLED, with an `end_reason` tag, the RUNNING runs of experiment `exp_id` whose owner process
    (`process_tags`) on this host is gone: a killed command never ends its runs. Runs of other hosts and runs
    without owner tags are left alone, as their processes cannot be checked. One search query; returns the ids
    of the runs ended."""
    host = socket.gethostname()
    runs = client.search_runs([exp_id], f"attributes.status = 'RUNNING' and tags.host = '{host}'",
                              max_results=1000)
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid, started = int(tags["pid"]), float(tags["process_start"])
        except (KeyError, ValueError):
            continue
        if _process_alive(pid, started):
            continue
        client.set_tag(run.info.run_id, "end_reason", f"process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """MLflow's source tags for the code that runs: git commit and branch of this checkout, and `git_dirty`
    (tracked files changed since that commit). {} when the code is not a git checkout (a pip install)."""
    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "mlflow.source.git.branch": branch,
            "git_dirty": "true" if dirty else "false"}


def producer_run(uri: str, experiment: str | None, stage: str, key: str) -> tuple[str, str] | None:
    """(run id, experiment id) of the finished run that made artifact `stage/key`, if this tracking store has it:
    in `experiment`, or in any experiment when None."""
    client = _client(uri)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        ids = [exp.experiment_id] if (exp := client.get_experiment_by_name(experiment)) else []
    if not ids:
        return None
    runs = client.search_runs(ids, f"tags.stage_key = '{key}' and tags.stage = '{stage}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=50)
    run = next((r for r in runs if r.data.tags.get("cached") != "true"), None)
    return (run.info.run_id, run.info.experiment_id) if run else None


def one_line_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}"[:500] if text else type(exc).__name__


_NOT_NAME_CHAR = re.compile(r"[^\w./ :-]")  # MLflow keys: alphanumerics (any script), _ - . / space colon
MAX_KEY_LENGTH = 250  # MLflow's limit on metric, param and tag keys


def valid_name(name: str) -> str:
    """`name` as a valid MLflow metric, param or tag key: every other character becomes `_`, and path-like
    spellings MLflow rejects (empty, `.`, `..` segments, a leading `/`) are filled with `_`. A valid name is
    returned unchanged; one over 250 characters is cut, with a hash of the whole name at its end."""
    clean = _NOT_NAME_CHAR.sub("_", name)
    clean = "/".join("_" if part in ("", ".", "..") else part for part in clean.split("/"))
    if clean.startswith(".."):  # MLflow reads any leading `..` as a way out of the run's folder
        clean = "_" + clean
    if len(clean) > MAX_KEY_LENGTH:
        clean = f"{clean[:MAX_KEY_LENGTH - 9]}-{_short_hash(name)}"
    assert posixpath.normpath(clean) == clean and clean not in (".", "") and not clean.startswith(("/", "..")), clean
    return clean


def _short_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def valid_names(names: list[str]) -> dict[str, str]:
    """Each name -> a distinct valid MLflow key (`valid_name`). Names already valid keep their spelling; a
    changed name that would collide with another gets `-<hash of the original>` appended."""
    out: dict[str, str] = {n: n for n in names if valid_name(n) == n}
    taken = set(out.values())
    for name in names:
        if name in out:
            continue
        key = valid_name(name)
        if key in taken:
            key = f"{key[:MAX_KEY_LENGTH - 9]}-{_short_hash(name)}"
        out[name] = key
        taken.add(key)
    return out


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:500]


class StageRun:
    """One MLflow run; use as a context manager. Marks FAILED if the block raises. `tags` that are None are left
    out (a run with no parent: `mlflow.parentRunId` None)."""

    def __init__(self, uri: str, experiment: str, store: ArtifactStore, name: str, *, stage: str | None = None,
                 key: str | None = None, tags: dict[str, str | None] | None = None, source: str | None = None):
        self.uri, self.key = uri, key
        self.client = _client(uri)
        exp = experiment_id(uri, experiment, store)
        all_tags = {"mlflow.runName": name, "mlflow.source.type": "LOCAL",
                    "mlflow.source.name": source or "(built-in defaults)", **code_version(), **process_tags(),
                    **{k: v for k, v in {"stage": stage, "stage_key": key, **(tags or {})}.items() if v}}
        self.run_id = self.client.create_run(exp, run_name=name, tags=all_tags).info.run_id
        self.monitor = None

    def log_input(self, name: str, digest: str, source: str, profile: dict, context: str = "training") -> None:
        """Record a data set as this run's input, as `mlflow.log_input` does (the run page's Datasets, searchable
        as `dataset.digest`): its `name`, `digest` (its fingerprint, at most 36 characters), `source` (a URI or
        path), a JSON `profile`, tagged with its `context` (training, evaluation)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        scheme = source.split("://")[0] if "://" in source else "local"
        dataset = Dataset(name=name, digest=digest[:36], source_type=scheme, source=json.dumps({"uri": source}),
                          profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def watch_system(self) -> None:
        """Log MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network, and GPU with
        nvidia-ml-py) to this run until it ends, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10);
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
        self.monitor.start()

    def end(self, failed: bool = False, error: BaseException | str | None = None) -> None:
        """Close the run: FINISHED, or FAILED with the error's first line in the `error` tag."""
        if getattr(self, "monitor", None) is not None:
            self.monitor.finish()
            self.monitor = None
        if error is not None:
            self.client.set_tag(self.run_id, "error", error if isinstance(error, str) else one_line_error(error))
        self.client.set_terminated(self.run_id, "FAILED" if failed or error is not None else "FINISHED")

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None, error=exc)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        keys = valid_names(sorted(params))  # names can come from the data or the user
        items = [Param(keys[k], _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keys = valid_names(list(metrics))  # e.g. splits.<a val subset's label>.prompts
        items = [Metric(keys[k], float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        keys = valid_names(list(tags))
        for k, v in tags.items():
            self.client.set_tag(self.run_id, keys[k], v)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=name)

    def log_dict(self, obj: dict, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_file(self, data: bytes, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(data)
            sub = os.path.dirname(name) or None
            self.client.log_artifact(self.run_id, path, artifact_path=sub)

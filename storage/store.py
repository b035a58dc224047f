"""The artifact store: content-addressed stage outputs over any fsspec filesystem.

Layout: `<root>/<stage>/<key>/...`. An artifact is complete only when its
`manifest.json` exists and its files are those the manifest recorded; the
manifest is written last and atomically, so a crashed stage leaves no manifest
and is redone, never half-read. A stage claims its key before the work
(`begin`), so two runs never compute one key at once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import filelock
import fsspec

MANIFEST = "manifest.json"
# Folders under the root that hold no stage's artifacts: MLflow's artifacts and the commands' failure logs (the
# stages themselves are pipeline/stage_table.py's, which the store does not know).
NOT_STAGES = ("mlartifacts", "logs")
DAMAGED = ".damaged-"  # a damaged artifact is moved aside to `<stage>/<key>.damaged-<time>`
LOCKS = ".locks"
_log = logging.getLogger("dalle")


class StoreError(RuntimeError):
    """A store problem a user can act on (missing artifact, unwritable root); one line."""


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1 and 1.0 hash alike
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def content_key(config: dict, inputs: dict[str, str] | None = None, length: int = 12) -> str:
    """Short stable hash of a stage's config section and the keys of its inputs.

    Dict order and float spelling (1e-3 vs 0.001, 1 vs 1.0) do not change it.
    """
    payload = json.dumps({"config": _canonical(config), "inputs": _canonical(inputs or {})},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("dalle-pipeline")
    except Exception:  # not installed (running from a source tree)
        return "source"


def redo_hint(stage: str) -> str:
    """How a user redoes a store stage's artifact, as the end of an error line."""
    return f"redo it with `dalle run --force {stage}`"


def file_sha256(fs, path: str) -> str:
    """Hex sha256 of a file, streamed in 4 MB chunks (memory stays flat for GB shards)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a local file's sha256 (`file_sha256`), remembered while size and mtime stay."""
    st = os.stat(path)
    return _local_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _local_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(fsspec.filesystem("file"), path)[:16]


@dataclass
class ArtifactInfo:
    stage: str
    key: str
    complete: bool
    size: int
    created: str | None
    state: str = ""  # complete | INCOMPLETE | DAMAGED
    problem: str | None = None  # what is wrong with a damaged artifact, in a few words


# ------------------------------------------------------------------ claims

_HELD: dict[tuple[str, str, str], Claim] = {}  # this process's claims, by (store url, stage, key)
_HELD_LOCK = threading.Lock()


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"


class Claim:
    """One process's exclusive right to compute one stage key.

    Local stores: an OS file lock (`filelock`) under `<root>/.locks/`, which the OS drops when the owner dies.
    Object stores: a claim file created atomically (`xb`) holding the owner (host, pid, time), whose
    `heartbeat` a background thread refreshes every `heartbeat_s`; a claim whose heartbeat is older than
    `expire_s` belongs to a dead owner and is taken over.
    """

    def __init__(self, store: ArtifactStore, stage: str, key: str, *, os_lock: bool | None = None,
                 heartbeat_s: float = 30.0, expire_s: float = 120.0):
        assert heartbeat_s < expire_s
        self.store, self.stage, self.key = store, stage, key
        self.os_lock = store.local if os_lock is None else os_lock
        self.heartbeat_s, self.expire_s = heartbeat_s, expire_s
        base = posixpath.join(store.root, LOCKS, f"{stage}-{key}")
        self.lock_path, self.owner_path, self.claim_path = base + ".lock", base + ".owner", base + ".claim"
        self.me = _owner()
        self._lock: filelock.FileLock | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict | None:
        """Who holds the key (host, pid, since; heartbeat for claim files), None when unknown."""
        path = self.owner_path if self.os_lock else self.claim_path
        try:
            return json.loads(self.store.fs.cat_file(path))
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        """Take the claim if it is free (or expired); never waits."""
        fs = self.store.fs
        fs.makedirs(posixpath.dirname(self.lock_path), exist_ok=True)
        if self.os_lock:
            lock = filelock.FileLock(self.lock_path, thread_local=False)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                return False
            self._lock = lock
            self.store.write_json(self.owner_path, self.me)
            return True
        if not self._create():
            held = self.holder()
            if held is not None:
                age = time.time() - float(held.get("heartbeat", 0))
            else:  # being written, or written by a writer that died: its age is the file's
                try:
                    age = time.time() - fs.modified(self.claim_path).timestamp()
                except (OSError, NotImplementedError, ValueError, KeyError):
                    age = 0.0
            if age <= self.expire_s:
                return False
            _log.warning("%s/%s: the claim of %s has no heartbeat for %.0fs; taking it over", self.stage,
                         self.key, _describe(held), age)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(self.claim_path)
            return self.try_acquire()
        if (self.holder() or {}).get("token") != self.me["token"]:  # a racing writer won
            return False
        self._beat = threading.Thread(target=self._heartbeat, name=f"claim-{self.stage}-{self.key}", daemon=True)
        self._beat.start()
        return True

    def _create(self) -> bool:
        """Create the claim file unless one exists (False then)."""
        data = json.dumps({**self.me, "heartbeat": time.time()}).encode()
        self.store._fresh(self.claim_path)
        try:
            with self.store.fs.open(self.claim_path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive create here: write, then read back
            if self.store.exists(self.claim_path):
                return False
            self.store.write_bytes(self.claim_path, data)
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.holder() or {}).get("token") != self.me["token"]:
                _log.error("%s/%s: this process lost its claim (taken over after a missed heartbeat)",
                           self.stage, self.key)
                return
            self.store.write_json(self.claim_path, {**self.me, "heartbeat": time.time()})

    def acquire(self, log: Callable[[str], None] | None = None, poll_s: float = 0.5, report_s: float = 60.0) -> None:
        """Wait until the claim is ours, logging who holds it and, every `report_s`, how long we have waited."""
        start = next_report = time.monotonic()
        while not self.try_acquire():
            now = time.monotonic()
            if now >= next_report:
                (log or _log.info)(f"waiting for {self.stage}/{self.key}, claimed by {_describe(self.holder())}"
                                   f" ({now - start:.0f}s so far)")
                next_report = now + report_s
            time.sleep(poll_s)

    def release(self) -> None:
        """Give the claim up: unlock, or stop the heartbeat and delete the claim file if still ours."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.store.fs.rm(self.owner_path)
            self._lock.release()
            self._lock = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            if (self.holder() or {}).get("token") == self.me["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.rm(self.claim_path)


class ArtifactStore:
    """Stage outputs under one root URL (`./artifacts`, `memory://x`, `s3://bucket/prefix`)."""

    def __init__(self, root: str = "./artifacts", storage_options: dict | None = None):
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.claim_options: dict = {}  # Claim's keyword arguments (tests: a heartbeat claim on a local disk)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = os.path.abspath(self.root)
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as err:
                raise StoreError(f"store root {root!r} cannot be created: {err.strerror}") from None
            if not os.access(self.root, os.W_OK):
                raise StoreError(f"store root {root!r} is read-only; point store.root at a writable location")

    # ----------------------------------------------------------------- paths
    def path(self, stage: str, key: str, *parts: str) -> str:
        return posixpath.join(self.root, stage, key, *parts)

    def uri(self, path: str) -> str:
        """A URL other tools (pyarrow, datasets, mlflow) can open."""
        if self.local:
            return path
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{path.lstrip('/')}"

    # ----------------------------------------------------------------- bytes
    def _fresh(self, path: str) -> None:
        """Object-store clients cache listings; other processes write too, so always look again."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return self.fs.exists(path)

    def write_bytes(self, path: str, data: bytes) -> int:
        """Write atomically: to a temporary name beside the target, then rename."""
        parent = posixpath.dirname(path)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            self.fs.makedirs(parent, exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        except OSError as err:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            reason = err.strerror or str(err) or type(err).__name__
            raise StoreError(f"cannot write {self.uri(path)!r}: {reason}") from None
        return len(data)

    def read_bytes(self, path: str) -> bytes:
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"missing file {self.uri(path)!r}") from None

    def write_json(self, path: str, obj: Any) -> int:
        return self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, path: str) -> Any:
        data = self.read_bytes(path)
        with self.reading(path):
            return json.loads(data)

    def listdir(self, path: str) -> list[str]:
        """Names directly under `path` (files and folders), sorted; [] if absent."""
        self._fresh(path)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def files(self, stage: str, key: str) -> dict[str, int]:
        """Relative path -> size of every finished file of an artifact (no temporaries)."""
        base = self.path(stage, key)
        self._fresh(base)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for p, info in found.items():
            rel = posixpath.relpath(p, base)
            if not posixpath.basename(rel).startswith(".tmp-") and rel != MANIFEST:
                out[rel] = int(info.get("size") or 0)
        return dict(sorted(out.items()))

    # ------------------------------------------------------------- manifests
    def manifest(self, stage: str, key: str) -> dict | None:
        """The parsed manifest, None while there is none; a StoreError naming it when it is not valid JSON."""
        path = self.path(stage, key, MANIFEST)
        if not self.exists(path):
            return None
        try:
            m = json.loads(self.read_bytes(path))
        except ValueError as err:
            raise StoreError(f"{self.uri(path)!r} ({stage} artifact) is not valid JSON ({err}); "
                             f"{redo_hint(stage)}") from None
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise StoreError(f"{self.uri(path)!r} ({stage} artifact) is not a manifest (no file list); "
                             f"{redo_hint(stage)}")
        return m

    def check(self, stage: str, key: str, verify: bool = False) -> tuple[str, str | None, dict | None]:
        """(state, problem, manifest): "missing", "incomplete" (no manifest yet), "damaged" (the manifest is
        unreadable, a recorded file is missing or has another size, with `verify` another sha256, or an
        input was redone since) or "complete"."""
        if not self.exists(self.path(stage, key)):
            return "missing", None, None
        try:
            m = self.manifest(stage, key)
        except StoreError:
            return "damaged", "manifest.json is not valid JSON", None
        if m is None:
            return "incomplete", None, None
        found = self.files(stage, key)
        for rel, size in m["files"].items():
            if rel not in found:
                return "damaged", f"{rel} is missing", m
            if found[rel] != size:
                return "damaged", f"{rel} is {found[rel]} bytes, the manifest recorded {size}", m
        for stage_in, made_by in (m.get("input_ids") or {}).items():
            try:
                now = (self.manifest(stage_in, m["inputs"][stage_in]) or {}).get("id")
            except StoreError:
                now = None
            if now is not None and now != made_by:
                return "damaged", f"made from an earlier {stage_in}/{m['inputs'][stage_in]} (it was redone)", m
        if verify:
            for rel, digest in (m.get("sha256") or {}).items():
                if file_sha256(self.fs, self.path(stage, key, rel)) != digest:
                    return "damaged", f"{rel} does not match its recorded sha256", m
        return "complete", None, m

    def is_complete(self, stage: str, key: str) -> bool:
        """The manifest is there, valid, and every file it lists has its recorded size."""
        return self.check(stage, key)[0] == "complete"

    def require(self, stage: str, key: str) -> dict:
        """The manifest of a complete artifact, or a one-line error naming what is missing or damaged."""
        state, problem, m = self.check(stage, key)
        if state == "damaged":
            raise StoreError(f"artifact {stage}/{key} in store {self.url!r} is damaged: {problem}; "
                             f"{redo_hint(stage)}")
        if m is None or state != "complete":
            raise StoreError(f"missing upstream artifact {stage}/{key} in store {self.url!r}; run that stage first")
        return m

    @contextlib.contextmanager
    def reading(self, path: str) -> Iterator[None]:
        """Turn a failure to parse a stored file (truncated weights, a broken Parquet footer) into a StoreError
        naming the file, its stage and how to redo it."""
        try:
            yield
        except StoreError:
            raise
        except Exception as err:  # the parsers' own types (SafetensorError, ArrowInvalid, JSONDecodeError, ...)
            stage = posixpath.relpath(path, self.root).split("/")[0]
            reason = (str(err).strip().splitlines() or [""])[0]
            raise StoreError(f"cannot read {self.uri(path)!r} ({stage} artifact): {type(err).__name__}: "
                             f"{reason}; the file is damaged: {redo_hint(stage)}") from None

    # ---------------------------------------------------------------- claims
    def begin(self, stage: str, key: str, log: Callable[[str], None] | None = None,
              claim: bool = True) -> dict | None:
        """The manifest when `stage/key` is complete (reuse it); else claim the key and return None.

        The claim waits while another process holds it, then looks again, so a key is computed at most once
        at a time and a second run reuses the first's result. A damaged artifact is moved aside to
        `<key>.damaged-<time>` (evidence for the user, removed by `dalle gc`) and redone. The caller computes
        the artifact; `finish` ends the claim, `release` ends it on failure, and so does the process's exit.
        Claims are per process: a key this process already holds is not waited for. `claim=False` only looks
        (and moves a damaged artifact aside).
        """
        say = log or _log.info
        if self.check(stage, key)[0] == "complete":
            return self.manifest(stage, key)
        held = (self.url, stage, key)
        with _HELD_LOCK:
            mine = held in _HELD
        if claim and not mine:
            claim = Claim(self, stage, key, **self.claim_options)
            claim.acquire(say)
            with _HELD_LOCK:
                _HELD[held] = claim
        state, problem, m = self.check(stage, key)
        if state == "complete":  # another run finished it while we waited
            self.release(stage, key)
            return m
        if state == "damaged":
            aside = f"{key}{DAMAGED}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            say(f"{stage}/{key} is damaged ({problem}); moved aside to {stage}/{aside} and redoing it")
            self.fs.mv(self.path(stage, key), self.path(stage, aside), recursive=True)
        return None

    def release(self, stage: str, key: str) -> None:
        """End this process's claim on `stage/key`, if it holds one."""
        with _HELD_LOCK:
            claim = _HELD.pop((self.url, stage, key), None)
        if claim is not None:
            claim.release()

    def claimed_by(self, stage: str, key: str) -> dict | None:
        """Who holds `stage/key` now (host, pid, since), or None when nobody does; takes nothing."""
        if (self.url, stage, key) in _HELD:
            return _HELD[(self.url, stage, key)].me
        claim = Claim(self, stage, key, **self.claim_options)
        if claim.try_acquire():
            claim.release()
            return None
        return claim.holder() or {}

    def prepare(self, stage: str, key: str) -> None:
        """Make an incomplete artifact ready to be (re)done: drop leftovers of a killed write.

        Finished parts (shards written atomically, checkpoints) are kept so the
        stage resumes instead of starting over.
        """
        assert not self.is_complete(stage, key)
        base = self.path(stage, key)
        self._fresh(base)
        try:
            leftovers = [p for p in self.fs.find(base) if posixpath.basename(p).startswith(".tmp-")]
        except FileNotFoundError:
            leftovers = []
        for p in leftovers:
            self.fs.rm(p)

    def finish(self, stage: str, key: str, *, config: dict, inputs: dict[str, str],
               rows: dict[str, int] | None = None, **extra: Any) -> dict:
        """Write the manifest last; from then on the artifact is complete and read-only, and the claim ends.

        The manifest records every file's size (checked at each reuse) and sha256 (`dalle status --verify`),
        and the id of each input's manifest, so an artifact made from an input that was redone since is
        redone too. Raises StoreError when the artifact is already complete: it is never rewritten.
        """
        if self.exists(self.path(stage, key, MANIFEST)):
            raise StoreError(f"{stage}/{key} is already complete in store {self.url!r}; a finished artifact is "
                             "never rewritten")
        files = self.files(stage, key)
        input_ids = {}
        for stage_in, key_in in inputs.items():
            with contextlib.suppress(StoreError):
                if (made := (self.manifest(stage_in, key_in) or {}).get("id")) is not None:
                    input_ids[stage_in] = made
        manifest = {
            "stage": stage,
            "key": key,
            "id": uuid.uuid4().hex,
            "files": files,
            "sha256": {rel: file_sha256(self.fs, self.path(stage, key, rel)) for rel in files},
            "size": sum(files.values()),
            "rows": rows or {},
            "config": config,
            "inputs": inputs,
            "input_ids": input_ids,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            **extra,
        }
        self.write_json(self.path(stage, key, MANIFEST), manifest)
        self.release(stage, key)
        return manifest

    def remove(self, stage: str, key: str) -> None:
        base = self.path(stage, key)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)

    def artifacts(self, stages: str | list[str] | tuple[str, ...] | None = None,
                  verify: bool = False) -> list[ArtifactInfo]:
        """Every artifact of `stages` (one name or several; default every folder under the root but hidden ones
        and NOT_STAGES) with its state; damaged ones (and those moved aside) say why."""
        out = []
        names = [stages] if isinstance(stages, str) else stages or [
            n for n in self.listdir(self.root) if not n.startswith(".") and n not in NOT_STAGES
            and self.fs.isdir(posixpath.join(self.root, n))]
        for st in names:
            for key in self.listdir(posixpath.join(self.root, st)):
                state, problem, m = self.check(st, key, verify)
                if DAMAGED in key:
                    state, problem = "damaged", "moved aside after damage was found"
                size = m["size"] if m and state == "complete" else sum(self.files(st, key).values())
                created = m.get("created") if m else None
                label = {"complete": "complete", "damaged": "DAMAGED"}.get(state, "INCOMPLETE")
                out.append(ArtifactInfo(st, key, state == "complete", size, created, label, problem))
        return out

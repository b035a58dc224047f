"""The artifact store: content-addressed stage outputs over any fsspec filesystem.

Layout: `<root>/<stage>/<key>/...`. An artifact is complete only when its
`manifest.json` exists; the manifest is written last and atomically, so a
crashed stage leaves no manifest and is redone, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

MANIFEST = "manifest.json"
STAGES = ("images", "dvae", "bpe", "tokens", "transformer", "clip", "generations", "evaluation")


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


def stage_key(config: dict, inputs: dict[str, str] | None = None, length: int = 12) -> str:
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


@dataclass
class ArtifactInfo:
    stage: str
    key: str
    complete: bool
    size: int
    created: str | None


class ArtifactStore:
    """Stage outputs under one root URL (`./artifacts`, `memory://x`, `s3://bucket/prefix`)."""

    def __init__(self, root: str = "./artifacts", storage_options: dict | None = None):
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
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
        return json.loads(self.read_bytes(path))

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
        path = self.path(stage, key, MANIFEST)
        return self.read_json(path) if self.exists(path) else None

    def is_complete(self, stage: str, key: str) -> bool:
        return self.exists(self.path(stage, key, MANIFEST))

    def require(self, stage: str, key: str) -> dict:
        """The manifest of a complete artifact, or a one-line error naming what is missing."""
        m = self.manifest(stage, key)
        if m is None:
            raise StoreError(f"missing upstream artifact {stage}/{key} in store {self.url!r}; run that stage first")
        return m

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
        """Write the manifest last; from then on the artifact is complete and read-only."""
        files = self.files(stage, key)
        manifest = {
            "stage": stage,
            "key": key,
            "files": files,
            "size": sum(files.values()),
            "rows": rows or {},
            "config": config,
            "inputs": inputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            **extra,
        }
        self.write_json(self.path(stage, key, MANIFEST), manifest)
        return manifest

    def remove(self, stage: str, key: str) -> None:
        base = self.path(stage, key)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)

    def artifacts(self, stage: str | None = None) -> list[ArtifactInfo]:
        out = []
        for st in [stage] if stage else self.listdir(self.root):
            if st not in STAGES:
                continue
            for key in self.listdir(posixpath.join(self.root, st)):
                m = self.manifest(st, key)
                size = m["size"] if m else sum(self.files(st, key).values())
                out.append(ArtifactInfo(st, key, m is not None, size, m["created"] if m else None))
        return out

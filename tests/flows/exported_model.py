"""An exported copy of the shared tiny `generated` store's model, made once per session (tests/flows/conftest.py
makes the store; this folder is read-only for the tests, like the store)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def exported_folder(store_dir: str, overrides: tuple[str, ...]) -> Path:
    from pipeline.config import load_config
    from release.export import export_model
    from tests.conftest import TINY

    out = Path(store_dir) / "exported-model"
    export_model(load_config(TINY, list(overrides)), str(out))
    return out

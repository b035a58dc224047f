"""Damaged artifacts seen from the stages and the CLI: a file that cannot be read is one line naming it, its
stage and how to redo it; `dalle status` and `dalle gc` report damage instead of crashing."""

from dataclasses import asdict

import pytest
from prefect.states import Failed

from cli.main import main
from dalle_core.transformer import DALLE, DALLEConfig
from pipeline.artifacts import no_retry_on_user_error
from pipeline.checkpoints import state_bytes
from pipeline.models import load_transformer
from storage.store import ArtifactStore, StoreError


def _transformer(store: ArtifactStore, key: str = "k") -> str:
    c = DALLEConfig(text_vocab=16, text_len=4, image_vocab=8, image_grid=2, dim=8, depth=1, heads=1)
    store.write_bytes(store.path("transformer", key, "model.safetensors"), state_bytes(DALLE(c)))
    store.write_json(store.path("transformer", key, "config.json"), asdict(c))
    store.finish("transformer", key, config={}, inputs={})
    return store.path("transformer", key, "model.safetensors")


def test_unreadable_weights_are_one_line_naming_file_and_stage(tmp_path):
    store = ArtifactStore(str(tmp_path))
    path = _transformer(store)
    assert load_transformer(store, "k").c.dim == 8
    data = store.read_bytes(path)
    with open(path, "wb") as f:  # same size, so only reading it finds out (a bad sector, a botched copy)
        f.write(b"\xff" * 8 + data[8:])
    with pytest.raises(StoreError) as err:
        load_transformer(store, "k")
    msg = str(err.value)
    assert msg.startswith(f"cannot read '{path}' (transformer artifact): SafetensorError: ") and "\n" not in msg
    assert msg.endswith("the file is damaged: redo it with `dalle run --force transformer`")
    with open(path, "wb") as f:  # truncated: the manifest's sizes catch it before any parsing
        f.write(data[:100])
    with pytest.raises(StoreError, match=r"^artifact transformer/k in store .* is damaged: model.safetensors "
                                         r"is 100 bytes, the manifest recorded \d+; redo it with "
                                         r"`dalle run --force transformer`$"):
        load_transformer(store, "k")


def test_damaged_file_is_not_retried():
    assert not no_retry_on_user_error(None, None, Failed(data=StoreError("cannot read 'x'")))
    assert no_retry_on_user_error(None, None, Failed(data=OSError("connection reset")))


def test_status_and_gc_report_damaged_artifacts(tmp_path, capsys):
    store = ArtifactStore(str(tmp_path / "store"))
    path = _transformer(store, "bad")
    _transformer(store, "flipped")
    with open(store.path("transformer", "bad", "manifest.json"), "w") as f:
        f.write("{not json")
    flipped = store.path("transformer", "flipped", "model.safetensors")
    data = store.read_bytes(flipped)
    with open(flipped, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    ov = ["--set", f"store.root={tmp_path / 'store'}"]
    assert main(["status", *ov]) == 0
    out = capsys.readouterr().out
    assert "transformer  bad" in out and "DAMAGED: manifest.json is not valid JSON; `dalle gc` removes it" in out
    assert [line for line in out.splitlines() if "flipped" in line][0].endswith("complete")  # sizes match
    assert main(["status", "--verify", *ov]) == 1
    assert "DAMAGED: model.safetensors does not match its recorded sha256" in capsys.readouterr().out
    assert main(["gc", *ov]) == 0
    out = capsys.readouterr().out
    assert "removing transformer/bad (damaged: manifest.json is not valid JSON)" in out
    assert not store.exists(path) and store.exists(flipped)

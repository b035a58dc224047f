"""The `dalle` command's error paths: each exits 2 with one line naming what is wrong."""

import shutil

import pytest

from flows.cli import main
from tests.conftest import TINY


def _sets(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def _one_line_error(capsys, *expect: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(e in last for e in expect), err
    return last


@pytest.mark.parametrize("args,expect", [
    (["run", "--only", "generate", "--from", "dvae"], ["--only or --from"]),
    (["run", "--force", "dvea"], ["'dvea'", "stages are ingest"]),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"], ["'/nonexistent/prompts.txt'", "does not exist"]),
    (["run", "--set", "transformer.depth"], ["'transformer.depth'", "key.path=value"]),
    (["run", "--set", "runner.device=gpu"], ["runner.device", "auto, cpu, cuda or cuda:N", "'gpu'"]),
])
def test_bad_arguments_fail_in_one_line_before_any_work(tiny, capsys, args, expect):
    config, make = tiny
    assert main([*args, "-c", config, *_sets(make())]) == 2
    _one_line_error(capsys, *expect)


def test_only_a_stage_whose_upstream_is_missing(tiny, capsys):
    config, make = tiny
    assert main(["run", "-c", config, *_sets(make()), "--only", "generate"]) == 2
    _one_line_error(capsys, "missing upstream artifact transformer/", "run that stage first")


def test_ui_on_an_empty_store(tiny, capsys):
    config, make = tiny
    assert main(["ui", "-c", config, *_sets(make())]) == 2
    _one_line_error(capsys, "no runs tracked in", "run a stage first")


def test_gc_unreferenced_keeps_what_the_config_uses(generated, tmp_path, capsys):
    from dalle_core.config import load_config
    from tasks.common import open_store, stage_keys

    src, ov, _ = generated
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    ov = [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *ov[2:]]
    cfg = load_config(TINY, ov)
    store, keys = open_store(cfg), stage_keys(cfg)
    shutil.copytree(store.path("dvae", keys["dvae"]), store.path("dvae", "0123456789ab"))  # another config's
    shutil.copytree(store.path("clip", keys["clip"]), store.path("clip", "ba9876543210"))
    store.fs.rm(store.path("clip", "ba9876543210", "manifest.json"))  # and an unfinished one
    before = {(a.stage, a.key) for a in store.artifacts()}
    assert main(["gc", "--unreferenced", "-c", str(TINY), *_sets(ov)]) == 0
    after = {(a.stage, a.key) for a in store.artifacts()}
    removed = before - after  # (other tests may have left generations of other prompts in the shared store)
    assert {("dvae", "0123456789ab"), ("clip", "ba9876543210")} <= removed
    assert not any(key == keys[stage] for stage, key in removed)
    assert all(store.is_complete(s, k) for s, k in after)
    assert {("dvae", keys["dvae"]), ("transformer", keys["transformer"]), ("generations", keys["generations"])} <= after

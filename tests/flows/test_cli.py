"""The `dalle` command's error paths: each exits 2 with one line naming what is wrong."""

import io
import logging
import shutil

import prefect.main  # noqa: F401  (sets up Prefect's console logging outside any capture)
import pytest

from cli.main import main
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
    (["run", "--only", "generate", "--from", "dvae"], ["not only (--only) and from_stage (--from)"]),
    (["run", "--force", "dvea"], ["'dvea'", "stages are ingest"]),
    (["run", "--only", "generate", "--force", "dvae"], ["--force dvae would remove dvae/", "e.g. --from dvae"]),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"], ["'/nonexistent/prompts.txt'", "does not exist"]),
    (["run", "--set", "transformer.depth"], ["'transformer.depth'", "key.path=value"]),
    (["run", "--set", "runner.device=gpu"], ["runner.device", "auto, cpu, cuda or cuda:N", "'gpu'"]),
])
def test_bad_arguments_fail_in_one_line_before_any_work(tiny, capsys, args, expect):
    config, make = tiny
    assert main([*args, "-c", config, *_sets(make())]) == 2
    _one_line_error(capsys, *expect)


def test_only_a_stage_whose_upstream_is_missing(store_copy, monkeypatch, capsys):
    # the store has ingest..pretokenize: the first stage generate reads that is missing is the transformer
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: pytest.fail("Prefect started"))
    assert main(["run", "-c", str(TINY), *_sets(store_copy), "--only", "generate"]) == 2
    _one_line_error(capsys, "missing upstream artifact transformer/", "run that stage first")


def test_ui_on_an_empty_store(tiny, capsys):
    config, make = tiny
    assert main(["ui", "-c", config, *_sets(make())]) == 2
    _one_line_error(capsys, "no runs tracked in", "run a stage first")


def test_gc_unreferenced_keeps_what_the_config_uses(generated, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.stage_table import stage_keys

    src, ov, _ = generated
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    ov = [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *ov[2:]]
    cfg = load_config(TINY, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
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
    assert {("dvae", keys["dvae"]), ("transformer", keys["transformer"]), ("generate", keys["generate"])} <= after


def test_emoji_and_other_planes_reach_the_flow_exactly(tiny, monkeypatch, capsys):
    config, make = tiny
    calls: list = []
    monkeypatch.setattr("flows.pipeline_flow.pipeline_flow", lambda cfg, **kw: calls.append((cfg, kw)) or {})
    prompts = ["😀🎨🌈", "\U00020000 plane 2", "\ue000 private use", 'a "quoted" # prompt: - !&*%', "nel\x85ls\u2028"]
    assert main(["generate", "-c", config, *_sets(make()), *prompts]) == 0
    cfg, kwargs = calls[-1]
    assert kwargs["until"] == "generate" and cfg.generate.prompts == prompts


def test_empty_prompt_fails_before_prefect_starts(tiny, monkeypatch, capsys):
    config, make = tiny
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: pytest.fail("Prefect started"))
    assert main(["generate", "-c", config, *_sets(make()), "a red circle", "  "]) == 2
    _one_line_error(capsys, "generate.prompts: prompt 2 of 2 is '  '", "every prompt needs some text")


def test_unwritable_store_fails_before_prefect_and_leaves_nothing_in_the_cwd(tiny, monkeypatch, tmp_path, capsys):
    config, make = tiny
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: pytest.fail("Prefect started"))
    assert main(["run", "-c", config, *_sets(make("store=http://127.0.0.1:9/x"))]) == 2
    _one_line_error(capsys, "store 'http://127.0.0.1:9/x' cannot be written", "HTTPFileSystem cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no ./mlruns, no store


def test_a_deleted_mlflow_experiment_is_one_line_with_the_remedies(tiny, monkeypatch, tmp_path, capsys):
    """The experiment deleted in MLflow's UI: `dalle run` names it and says to restore it or pick another name,
    before Prefect starts; with another tracking.experiment the same run goes on."""
    import mlflow

    config, make = tiny
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("dalle"))
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: pytest.fail("Prefect started"))
    assert main(["run", "-c", config, *_sets(make())]) == 2
    _one_line_error(capsys, "MLflow experiment 'dalle' (id ", "is deleted; restore it (`MLFLOW_TRACKING_URI=sqlite:///",
                    " mlflow experiments restore --experiment-id ", "or set tracking.experiment to another name")
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: (_ for _ in ()).throw(SystemExit(7)))
    with pytest.raises(SystemExit):  # past the check: it went on to start Prefect
        main(["run", "-c", config, *_sets(make("tracking.experiment=dalle-2"))])


def test_an_unexpected_failure_names_the_stage_and_the_log_file(tiny, monkeypatch, tmp_path, capsys):
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    def broken(work):
        raise RuntimeError("boom\nsecond line")

    config, make = tiny
    monkeypatch.setattr("tasks.bpe._train", broken)
    console = io.StringIO()  # a terminal with Prefect's handler (pytest holds the one Prefect set up)
    handler = PrefectConsoleHandler(stream=console)
    handler.setFormatter(PrefectFormatter(format="%(levelname)s %(message)s", flow_run_fmt="%(message)s",
                                          task_run_fmt="%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        assert main(["train-bpe", "-c", config, *_sets(make())]) == 1
    finally:
        logging.getLogger().removeHandler(handler)
    shown = console.getvalue()
    assert "boom" in shown and "Traceback" not in shown, shown  # Prefect's log lines, without tracebacks
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2] == "error: bpe failed: RuntimeError: boom", lines
    path = lines[-1].removeprefix("full traceback: ")
    assert path.startswith(str(tmp_path / "store" / "logs")), path
    log = open(path, encoding="utf-8").read()
    assert "Traceback" in log and 'raise RuntimeError("boom' in log and "second line" in log


def test_a_batch_larger_than_the_data_fails_before_anything_trains(tiny, monkeypatch, capsys):
    from pipeline.config import load_config
    from pipeline.stage_table import stage_keys

    config, make = tiny
    small = make("data.shapes.num_images=60", "data.val_fraction=0.2", "clip.train.batch_size=64")
    assert main(["run", "-c", config, *_sets(small)]) == 2  # fresh store: checked in the pipeline after ingest
    cfg = load_config(config, small)
    store, keys = cfg.store.open(), stage_keys(cfg)
    rows = store.manifest("ingest", keys["ingest"])["rows"]["train"]
    assert rows < 64
    expect = f"clip.train.batch_size=64 is larger than the {rows} training rows of ingest/{keys['ingest']}; " \
             f"use at most {rows}"
    assert _one_line_error(capsys, expect)
    assert not store.exists(store.path("dvae", keys["dvae"]))  # nothing trained
    monkeypatch.setattr("cli.main.check_prefect_server", lambda: pytest.fail("Prefect started"))
    assert main(["train-clip", "-c", config, *_sets(small)]) == 2  # images there: checked before Prefect
    _one_line_error(capsys, expect)


def test_ctrl_c_is_one_line_and_exit_130(tiny, monkeypatch, capsys):
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    config, make = tiny
    monkeypatch.setattr("flows.pipeline_flow.pipeline_flow", interrupted)
    assert main(["train-bpe", "-c", config, *_sets(make())]) == 130
    _one_line_error(capsys, "train-bpe interrupted", "run the same command again")


@pytest.mark.parametrize("data,expect", [(b"caf\xe9\n", "is not UTF-8 (byte 0xe9 at offset 3)"),
                                         ("\ufeffa red circle\n".encode(), None)])
def test_prompts_file_encoding(tiny, monkeypatch, tmp_path, capsys, data, expect):
    import cli.main

    seen = []
    monkeypatch.setattr(cli.main, "check_store", lambda cfg: seen.append(list(cfg.generate.prompts)) or 1 / 0)
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    config, make = tiny
    code = main(["generate", "-c", config, "--prompts-file", str(path), *_sets(make())])
    if expect:
        assert code == 2
        _one_line_error(capsys, f"--prompts-file '{path}'", expect)
    else:  # the byte-order mark is not part of the first prompt
        assert code == 1 and seen == [["a red circle"]]


def test_from_runs_the_stage_and_what_reads_it():
    from pipeline.stage_table import select_stages

    assert select_stages(from_stage="pretokenize") == ["pretokenize", "transformer", "generate", "evaluate"]
    assert select_stages(until="clip") == ["ingest", "bpe", "clip"]

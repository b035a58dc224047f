"""`dalle export`, the exported folder, the Python API on it, `dalle generate --model`, and the registered MLflow
model through MLflow's own loading and scoring paths."""

import base64
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cli.main import main
from dalle_core.generate import DALLEPipeline, EditRequest, prompt_seed
from dalle_core.model_folder import ModelFolderError
from dalle_core.sampling import GenerationError, SamplingSettings
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from tests.conftest import DEVICES, TINY
from tests.flows.exported_model import exported_folder


def _sets(ov):
    return sum((["--set", o] for o in ov), [])


@pytest.fixture(scope="session")
def exported(generated):
    tmp, ov, _ = generated
    return exported_folder(str(tmp), tuple(ov))


@pytest.fixture(scope="session")
def pipe(exported):
    return DALLEPipeline.from_pretrained(exported, device="cpu")


def test_export_is_a_self_contained_folder_and_byte_identical_twice(generated, exported, tmp_path, capsys):
    _, ov, _ = generated
    index = json.loads((exported / "model_index.json").read_text())
    assert {"transformer", "dvae", "tokenizer", "clip"} <= set(index) and index["format"] == "dalle-pipeline"
    for part in ("transformer", "dvae", "clip"):
        assert (exported / part / "model.safetensors").is_file() and (exported / part / "config.json").is_file()
    assert (exported / "tokenizer" / "tokenizer.json").is_file()
    again = tmp_path / "again"
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(again)]) == 0
    assert str(again) in capsys.readouterr().out
    files = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (exported / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(again)]) == 0  # replaces an earlier export
    assert (again / "model_index.json").read_bytes() == (exported / "model_index.json").read_bytes()


def test_model_card_has_licence_config_metrics_commit_and_samples(generated, exported):
    _, ov, _ = generated
    card = (exported / "README.md").read_text()
    keys = stage_keys(load_config(TINY, ov))
    assert card.startswith("---\nlicense: mit\n")
    assert "shapes" in card and "MIT licence" in card
    assert "transformer.val_bits_per_image_token" in card and "dvae.val_psnr" in card
    assert "git commit `" in card and keys["transformer"] in card
    assert "codebook_size: 64" in card  # the run's config
    assert "](samples.png)" in card and Image.open(exported / "samples.png").size[0] > 32
    assert str(generated[0]) not in card  # no machine paths (store, tracking) in a card meant to be shared


def test_imagefolder_licence_and_attribution_travel_with_the_model(tmp_path):
    from release.model_card import data_licence

    (tmp_path / "ATTRIBUTION.md").write_text("All emojis designed by OpenMoji. License: CC BY-SA 4.0\n")
    (tmp_path / "LICENSE.txt").write_text("Attribution-ShareAlike 4.0 International\n")
    cfg = load_config(TINY, ["data.source=imagefolder", f"data.path={tmp_path}"])
    licence = data_licence(cfg)
    assert licence.spdx == "cc-by-sa-4.0" and set(licence.files) == {"ATTRIBUTION.md", "LICENSE.txt"}
    assert "> All emojis designed by OpenMoji" in licence.text and "same licence" in licence.text
    bare = tmp_path / "bare"
    bare.mkdir()
    unknown = data_licence(load_config(TINY, ["data.source=imagefolder", f"data.path={bare}"]))
    assert unknown.spdx == "other" and "add it before sharing" in unknown.text


def test_a_fresh_process_loads_the_folder_without_store_prefect_or_mlflow(exported, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from dalle_core.generate import DALLEPipeline; "
            f"out = DALLEPipeline.from_pretrained({str(exported)!r})('a red circle', num_candidates=2); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'fsspec', 'storage', "
            "'tasks', 'flows'}), len(out.images[0]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a single image: one thread is as fast, and steady on a busy CPU
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env=env)
    assert result.stdout.split() == ["[]", "2"], result.stderr[-2000:]


def test_exported_model_draws_what_the_store_model_draws(generated, pipe):
    from pipeline.models import load_pipeline

    _, ov, _ = generated
    cfg = load_config(TINY, ov)
    prompts = ["a red circle", "a blue square above a green diamond"]
    out = pipe(prompts, num_candidates=4, seed=7, cond_scale=1.5, top_k=20)
    store_pipe = load_pipeline(cfg)
    assert store_pipe.precision == pipe.precision
    settings = SamplingSettings(num_candidates=4, cond_scale=1.5, top_k=20, seed=7)
    want = store_pipe.candidates(prompts, [prompt_seed(7, i) for i in range(2)], settings)
    for j, (images, scores, _, codes) in enumerate(want):
        order = np.argsort(-scores, kind="stable")
        assert np.array_equal(out.image_tokens[j], codes[order]) and np.array_equal(out.pixels[j], images[order])
        assert np.allclose(out.scores[j], scores[order]) and all(np.diff(out.scores[j]) <= 0)
    assert out.seeds == [prompt_seed(7, 0), prompt_seed(7, 1)] and len(out.images[0]) == 4


def test_a_dvae_whose_code_table_is_a_parameter_samples(pipe):
    """A gumbel dVAE's code table (as a loaded OpenAI or taming tokenizer's) is a parameter, not a buffer: decoding
    the sampled codes, which are inference tensors, must not need autograd."""
    import copy
    from dataclasses import replace

    from dalle_core.dvae import DiscreteVAE

    gumbel = copy.copy(pipe)
    gumbel.dvae = DiscreteVAE(replace(pipe.dvae.c, quantizer="gumbel")).eval()
    assert gumbel.dvae.quantizer.embed.weight.requires_grad
    assert gumbel("a red circle", num_candidates=2, seed=0).pixels[0].shape[0] == 2


def test_a_seed_per_prompt_draws_what_each_prompt_draws_alone(pipe):
    """`seed=[...]` (how `dalle serve` merges its users): each prompt's images, codes and scores are those it gets
    alone with its seed; a progress list counts, per prompt, the steps of the batches that hold it."""
    prompts, seeds = ["a red circle", "a blue square", "a green diamond"], [5, 9, 5]
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    out = pipe(prompts, num_candidates=3, seed=seeds, batch_size=6, progress=[
        lambda d, t, j=j: seen[j].append((d, t)) for j in range(3)])
    assert out.seed == seeds
    for j, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = pipe(prompt, num_candidates=3, seed=seed)
        assert np.array_equal(out.image_tokens[j], alone.image_tokens[0]) and np.allclose(out.scores[j], alone.scores[0])
        assert out.seeds[j] == alone.seeds[0]
    steps = pipe.transformer.c.image_len  # 3 x 3 candidates in batches of 6: prompts 0 and 1, then prompt 2
    assert [seen[j][-1] for j in range(3)] == [(steps, steps)] * 3 and len(seen[0]) == steps
    assert seen[2][0] == (1, steps)  # its count starts when its own batch does


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": [""]}, "prompt 1 of 1 is ''"),
    ({"prompts": []}, "no prompts given"),
    ({"num_candidates": 0}, "num_candidates is 0; allowed: at least 1"),
    ({"top_p": 1.5}, "top_p is 1.5"),
    ({"temperature": 0}, "temperature is 0"),
    ({"cond_scale": -1}, "cond_scale is -1"),
    ({"top_k": 2.5}, "top_k is 2.5; it must be a whole number"),
    ({"edit": EditRequest("prime", b"not an image")}, "is not an image file"),
    ({"edit": EditRequest("prime", "/nonexistent.png")}, "does not exist"),
    ({"edit": EditRequest("prime", np.zeros((32, 32, 3), np.uint8), prime_rows=8)}, "prime_rows is 8; allowed: 1 to 7"),
    ({"edit": EditRequest("prime", None, prime_rows=2)}, "no prime_image was given"),
    ({"edit": EditRequest("inpaint", np.zeros((32, 32, 3), np.uint8), keep=0.5)}, "keep does not apply to edit_mode"),
    ({"colour": "red"}, "colour is not a sampling setting; allowed: num_candidates"),
    ({"settings": 4}, "settings is an int; give a SamplingSettings, or each setting by name"),
    ({"settings": {"seed": 1}}, "settings is a dict; give a SamplingSettings, or each setting by name"),
    ({"seed": 2**64}, "seed is 18446744073709551616; allowed: at least 0 and at most 9223372036854775807"),
    ({"edit": {"mode": "prime"}}, "edit is a dict; give an EditRequest"),
    ({"progress": 5}, "progress is an int; give a function"),
    ({"prompts": ["a", "b"], "seed": [1]}, "seed is a list of 1; give one seed per prompt (2), or one int for all"),
    ({"seed": [-1]}, "seed is -1; allowed: at least 0"),
    ({"progress": [print, print]}, "progress is a list of 2; give one function (done, total) -> None per prompt (1)"),
    ({"edit": EditRequest("prime", np.zeros((0, 0, 3), np.uint8))}, "prime image array is uint8"),
    ({"edit": EditRequest("inpaint", np.zeros((32, 32, 3), np.uint8), mask=np.ones((8, 8), np.int64))},
     "mask array is int64"),
    ({"prompts": None}, "prompts is None; give a string or a list of strings"),
    ({"prompts": 5}, "prompts is 5; give a string or a list of strings"),
    ({"prompts": ["x" * 5_000_000]}, "prompt 1 of 1 is 5000000 characters; allowed: at most 1000"),
    ({"prompts": ["ok", "a \ud800"]}, "prompt 2 of 2 is not valid text: character 3"),
    ({"edit": EditRequest("prime", "/")}, "prime image '/' is a directory; give an image file"),
    ({"cond_scale": 3.0, "guidance_start": 0.001, "guidance_end": 0.002}, "guidance_start 0.001 to guidance_end 0.002 "
     "holds none of the 64 image tokens, so nothing would be guided; widen it to at least 0.01562"),
    ({"guidance_schedule": "x" * 100000}, "guidance_schedule is a string of 100000 characters; allowed: constant, "
                                          "linear"),
])
def test_bad_generation_settings_are_one_line_errors(pipe, kwargs, message):
    kwargs = {"prompts": ["a red circle"], **kwargs}
    with pytest.raises(GenerationError, match=re.escape(message)) as err:
        pipe(kwargs.pop("prompts"), **kwargs)
    assert "\n" not in str(err.value)


def test_priming_keeps_the_top_rows_of_the_prime(pipe):
    from dalle_core.generate import load_prime

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    prime = load_prime(buf.getvalue(), 32)  # resized (shorter side) and centre-cropped to the dVAE's input
    codes = pipe.encode(prime)[:24]  # the top 3 rows of the 8x8 grid
    out = pipe("a red circle", num_candidates=3, edit=EditRequest("prime", buf.getvalue(), prime_rows=3))
    assert prime.shape == (32, 32, 3) and np.array_equal(out.prime, prime)
    assert all(np.array_equal(row[:24], codes.numpy()) for row in out.image_tokens[0])  # 3 rows of 8 codes


def test_a_prime_with_too_many_pixels_is_refused_before_decoding(pipe, tmp_path):
    from dalle_core.generate import load_prime

    path = tmp_path / "huge.png"
    Image.new("1", (4097, 4097)).save(path)  # a few KB on disk, 67 MB once decoded as RGBA
    with pytest.raises(GenerationError, match="is 4097x4097 pixels; allowed: at most 16777216 pixels"):
        load_prime(str(path), 32)
    with pytest.raises(GenerationError, match="4097x4097"):
        pipe("x", num_candidates=1, edit=EditRequest("prime", path.read_bytes()))


def test_a_damaged_or_foreign_folder_is_one_line(exported, tmp_path):
    with pytest.raises(ModelFolderError, match="has no model_index.json"):
        DALLEPipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "dvae" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ModelFolderError, match="dvae/model.safetensors"):
        DALLEPipeline.from_pretrained(broken)
    (broken / "transformer" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="transformer/config.json is missing"):
        DALLEPipeline.from_pretrained(broken)


def test_a_changed_byte_in_any_component_file_is_caught_by_every_way_in(exported, tmp_path, capsys, monkeypatch):
    """One byte changed (same size) in any file the index checksums: from_pretrained raises its documented
    ModelFolderError naming the file, `generate --model` and `serve` stop in one line before sampling (init_from
    through the same reader: test_finetune.py). A git-lfs pointer in place of the weights is named as such."""
    index = json.loads((exported / "model_index.json").read_text())
    assert len(index["sha256"]) >= 8  # every component's config and weights (and the tokenizers)
    for rel in index["sha256"]:
        damaged = tmp_path / rel.replace("/", "_")
        shutil.copytree(exported, damaged)
        data = bytearray((damaged / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (damaged / rel).write_bytes(bytes(data))
        with pytest.raises(ModelFolderError, match=f"{rel} is damaged") as err:
            DALLEPipeline.from_pretrained(damaged, device="cpu")
        assert "\n" not in str(err.value)
    damaged = tmp_path / "transformer_model.safetensors"
    monkeypatch.setattr("dalle_core.generate.DALLEPipeline.candidates", lambda *a, **k: pytest.fail("sampled"))
    assert main(["generate", "--model", str(damaged), "a red circle", "--out", str(tmp_path / "out")]) == 2
    assert "transformer/model.safetensors is damaged" in capsys.readouterr().err
    assert main(["serve", "--model", str(damaged), "--port", "0"]) == 2
    assert "transformer/model.safetensors is damaged" in capsys.readouterr().err

    pointer = tmp_path / "lfs"
    shutil.copytree(exported, pointer)
    (pointer / "dvae" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                        "oid sha256:4d7a\nsize 1048576\n")
    with pytest.raises(ModelFolderError, match="dvae/model.safetensors is a git-lfs pointer .*`git lfs pull`"):
        DALLEPipeline.from_pretrained(pointer, device="cpu")


def test_a_tokenizer_this_version_cannot_read_is_the_documented_error(exported, tmp_path):
    """A tokenizer.json in a format the installed tokenizers does not know (its checksum consistent: a newer
    export) is ModelFolderError naming the file and the version; a folder recording no checksums (an index
    edited by hand, another tool's) is refused, since nothing loads unchecked."""
    foreign = tmp_path / "foreign"
    shutil.copytree(exported, foreign)
    newer = b'{"version": "9.9", "model": {"type": "Unheard"}}'
    (foreign / "tokenizer" / "tokenizer.json").write_bytes(newer)
    index = json.loads((foreign / "model_index.json").read_text())
    index["sha256"]["tokenizer/tokenizer.json"] = hashlib.sha256(newer).hexdigest()[:16]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"tokenizer/tokenizer.json cannot be read by the installed "
                                               r"tokenizers \d"):
        DALLEPipeline.from_pretrained(foreign, device="cpu")
    del index["sha256"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"model_index.json records no checksum for transformer/config.json"):
        DALLEPipeline.from_pretrained(foreign, device="cpu")


def test_a_pipeline_tuned_in_a_notebook_saves_and_loads_back(exported, tmp_path):
    """save_pretrained writes the folder from_pretrained reads (every component, with checksums): the loaded copy
    holds the change made in memory and draws the same images; saving again keeps the user's own files."""
    tuned = DALLEPipeline.from_pretrained(exported, device="cpu")
    with torch.no_grad():  # a change made in a notebook
        for p in tuned.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    folder = tmp_path / "tuned"
    written = tuned.save_pretrained(folder)
    assert {os.path.relpath(p, folder) for p in written} >= {"model_index.json", "transformer/model.safetensors",
                                                              "clip/tokenizer.json", "tokenizer/config.json"}
    again = DALLEPipeline.from_pretrained(folder, device="cpu")
    for name, p in again.transformer.state_dict().items():
        assert torch.equal(p, tuned.transformer.state_dict()[name]), name
    assert (folder / "transformer/model.safetensors").read_bytes() != (exported / "transformer/model.safetensors").read_bytes()
    a, b = (p("a red circle", num_candidates=3, seed=5) for p in (tuned, again))
    assert np.array_equal(a.image_tokens[0], b.image_tokens[0]) and np.allclose(a.scores[0], b.scores[0], atol=1e-6)
    (folder / "NOTES.md").write_text("mine")
    tuned.save_pretrained(folder)
    assert (folder / "NOTES.md").read_text() == "mine"


def test_export_refuses_a_folder_that_is_not_an_export(generated, tmp_path, capsys):
    _, ov, _ = generated
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds notes.txt and is not an earlier export of this project" in err and (tmp_path / "notes.txt").exists()
    assert main(["export", "-c", str(TINY), *_sets(ov)]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_re_export_replaces_only_its_own_files(generated, tmp_path, capsys, monkeypatch):
    """A folder made a Hub repo after an export (.git, .gitattributes, notes, a picture, code in a component
    folder) keeps every file of the user's byte for byte when exported into again; a file the old export owned
    and the new one does not write is removed; a model_index.json that is not this project's, or a file of the
    user's where the export writes, is refused before anything is touched."""
    _, ov, _ = generated
    out = tmp_path / "repo"
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(out)]) == 0
    users = {".git/HEAD": b"ref: refs/heads/main\n", ".git/objects/ab/cdef": b"\x00blob", ".gitattributes":
             b"*.safetensors filter=lfs\n", "NOTES.md": b"my notes", "extra.png": b"\x89PNG mine",
             "transformer/how_i_trained.py": b"print('mine')\n"}
    for rel, data in users.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    index = json.loads((out / "model_index.json").read_text())
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "OLD-LICENCE.txt").write_text("an earlier export's file")
    index["files"].append("data/OLD-LICENCE.txt")
    (out / "model_index.json").write_text(json.dumps(index))
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(out)]) == 0, capsys.readouterr().err
    assert {rel: (out / rel).read_bytes() for rel in users} == users
    assert not (out / "data" / "OLD-LICENCE.txt").exists() and (out / "transformer" / "model.safetensors").is_file()
    assert "OLD-LICENCE.txt" not in (out / "model_index.json").read_text()

    index = json.loads((out / "model_index.json").read_text())  # the user's own README where the card goes
    index["files"].remove("README.md")
    (out / "model_index.json").write_text(json.dumps(index))
    card = (out / "README.md").read_bytes()
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(out)]) == 2
    assert "README.md is not a file an earlier export wrote" in capsys.readouterr().err
    assert (out / "README.md").read_bytes() == card

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "model_index.json").write_text(json.dumps({**index, "files": [*index["files"], "README.md", "NOTES.md"]}))
    before[Path("model_index.json")] = (out / "model_index.json").read_bytes()
    for rel, make in (("samples.png", lambda p: (p.unlink(), p.mkdir())),  # a folder where a file goes
                      ("clip", lambda p: (shutil.rmtree(p), p.write_text("mine")))):  # a file where a folder goes
        saved = {q.relative_to(out): q.read_bytes() for q in (out / rel).rglob("*") if q.is_file()} \
            if (out / rel).is_dir() else (out / rel).read_bytes()
        make(out / rel)
        assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(out)]) == 2
        assert f"--out '{out}': {rel} is not a file an earlier export wrote" in capsys.readouterr().err
        (shutil.rmtree if (out / rel).is_dir() else os.remove)(out / rel)
        if isinstance(saved, dict):
            for q, data in saved.items():
                (out / q).parent.mkdir(parents=True, exist_ok=True)
                (out / q).write_bytes(data)
        else:
            (out / rel).write_bytes(saved)
    real_replace = os.replace
    monkeypatch.setattr("dalle_core.model_folder.os.replace",
                        lambda *a: (_ for _ in ()).throw(OSError("disk full")))  # fails after every file moved
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(out)]) == 1
    capsys.readouterr()
    monkeypatch.setattr("dalle_core.model_folder.os.replace", real_replace)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # all put back
    assert (out / "NOTES.md").read_bytes() == users["NOTES.md"]  # an index listing it gives no right to remove it

    foreign = tmp_path / "work"  # a diffusers-style index among the user's code
    foreign.mkdir()
    (foreign / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (foreign / "train.py").write_text("print('mine')")
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", str(foreign)]) == 2
    assert "holds model_index.json, train.py and is not an earlier export" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["model_index.json", "train.py"]


def test_export_into_the_current_directory(generated, tmp_path, monkeypatch, capsys):
    _, ov, _ = generated
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", "."]) == 0, capsys.readouterr().err
    assert (here / "model_index.json").is_file() and os.path.samefile(os.getcwd(), here)  # still the cwd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary folder left beside it
    assert main(["export", "-c", str(TINY), *_sets(ov), "--out", "."]) == 0  # replaces itself in place
    assert (here / "model_index.json").is_file() and os.path.samefile(os.getcwd(), here)


def test_out_naming_a_file_and_prime_rows_without_prime_are_one_line(exported, tmp_path, capsys):
    afile = tmp_path / "x"
    afile.write_text("mine")
    assert main(["generate", "--model", str(exported), "p", "--out", str(afile)]) == 2
    assert f"--out {str(afile)!r} is a file; give a folder" in capsys.readouterr().err
    assert main(["export", "-c", str(TINY), "--out", str(afile)]) == 2
    assert f"--out {str(afile)!r} is a file; give a folder" in capsys.readouterr().err and afile.read_text() == "mine"
    out = tmp_path / "out"
    assert main(["generate", "--model", str(exported), "p", "--out", str(out), "--prime-rows", "3"]) == 2
    assert "--prime-rows is 3 but no --prime image was given" in capsys.readouterr().err and not out.exists()


def test_a_registered_model_without_a_tracking_store_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "models:/tiny-dalle/1", "p", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "pass -c CONFIG" in err and "MLFLOW_TRACKING_URI" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no ./mlflow.db, no out/


@pytest.mark.parametrize("args, message", [
    (["--register", "tiny-dalle", "--alias", "v2"], "--alias 'v2': an alias is letters, digits, '_' and '-', and "
                                                   "neither 'latest' nor v<number>"),
    (["--register", "tiny-dalle", "--alias", "latest"], "--alias 'latest': an alias is"),
    (["--register", "tiny-dalle", "--alias", "the champion"], "--alias 'the champion': an alias is"),
    (["--register", "tiny-dalle", "--alias", ""], "--alias '': an alias is"),  # an unset $ALIAS is no alias
    (["--register", ".."], "--register '..': a registered model name needs some text, no '/', ':' or '@', and"),
    (["--register", "a@b"], "--register 'a@b': a registered model name"),
    (["--out", "x", "--alias", "champion"], "--alias 'champion' names a registered version: give --register NAME")])
def test_a_bad_alias_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "-c", str(TINY), "--set", f"store.root={tmp_path / 'store'}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_downloaded_model_leaves_no_temporary_folder(exported, tmp_path, monkeypatch):
    import tempfile

    from pipeline.models import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipe = load_model(f"file://{exported}", device="cpu")
    assert pipe("a red circle", num_candidates=1, seed=0).pixels[0].shape == (1, 32, 32, 3)
    assert list(tmp_path.iterdir()) == []


def test_generate_with_model_writes_ranked_candidates_without_a_store(exported, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--model", str(exported), "a red circle", "a blue square", "--out", str(out),
            "--set", "generate.num_candidates=3", "--set", "generate.seed=5", "--set", "runner.device=cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seed 5" in printed and "top-1 CLIP score" in printed
    table = pq.read_table(out / "generations.parquet").to_pylist()
    assert len(table) == 6 and {r["seed"] for r in table} == {prompt_seed(5, 0), prompt_seed(5, 1)}
    assert (out / "contact_sheet.png").is_file() and (out / "grids" / "prompt-0001.png").is_file()
    assert main(["generate", "--model", str(exported), "x", "--out", str(out), "--set", "dvae.hidden=3"]) == 2
    assert "with --model only" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "x", "--out", str(out)]) == 2
    assert "is not an exported folder" in capsys.readouterr().err


def test_registered_model_serves_four_images_through_mlflow_scoring(generated, exported, tmp_path, capsys):
    """`dalle export --register` -> models:/NAME/1, linked to the stage runs, answering MLflow's scoring protocol."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow import MlflowClient
    from mlflow.pyfunc import scoring_server

    from pipeline.models import load_model
    from storage.tracking import StageRun

    src, ov, _ = generated
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ov = [*(o for o in ov if not o.startswith(("store.", "tracking."))), f"store.root={tmp_path / 'store'}",
          f"tracking.uri={uri}"]
    cfg = load_config(TINY, ov)
    keys = stage_keys(cfg)
    made_by = {}
    for stage in ("transformer", "dvae", "clip"):  # the training runs a real pipeline would have recorded
        with StageRun(uri, "dalle", cfg.store.open(), f"{stage}-{keys[stage]}", stage=stage, key=keys[stage],
                      tags={"cached": "false"}) as run:
            made_by[stage] = run.run_id
    assert main(["export", "-c", str(TINY), *_sets(ov), "--register", "tiny-dalle"]) == 0
    assert "registered models:/tiny-dalle/1" in capsys.readouterr().out
    client = MlflowClient(uri)
    version = client.get_model_version("tiny-dalle", "1")
    assert {version.tags[f"source_run.{s}"] for s in made_by} == set(made_by.values())
    assert client.get_run(made_by["transformer"]).data.tags["registered_model.tiny-dalle"] == "1"
    assert client.get_run(version.run_id).data.metrics["transformer.val_bits_per_image_token"] > 0

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tiny-dalle/1")
    params = model.metadata.get_params_schema().to_dict()
    assert {p["name"] for p in params} >= {"num_candidates", "cond_scale", "top_k", "top_p", "temperature", "seed"}
    http = TestClient(scoring_server.init(model))
    reply = http.post("/invocations", json={"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"]]},
                                            "params": {"num_candidates": 4, "seed": 3}})
    assert reply.status_code == 200, reply.text
    rows = reply.json()["predictions"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3] and rows[0]["clip_score"] >= rows[3]["clip_score"]
    image = Image.open(io.BytesIO(base64.b64decode(rows[0]["image"])))
    assert image.format == "PNG" and image.size == (32, 32)
    same = load_model("models:/tiny-dalle/1", tracking_uri=uri)("a red circle", num_candidates=4, seed=3)
    assert np.allclose([r["clip_score"] for r in rows], same.scores[0], atol=1e-5)
    bad = http.post("/invocations", json={"dataframe_split": {"columns": ["prompt"], "data": [[""]]}})
    assert bad.status_code == 400 and "every prompt needs some text" in bad.json()["message"]
    many = http.post("/invocations", json={"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"]]},
                                           "params": {"num_candidates": 20000}})
    assert many.status_code == 400 and "num_candidates is 20000; allowed: 1 to 64" in many.json()["message"]
    typo = http.post("/invocations", json={"dataframe_split": {"columns": ["prompt"], "data": [["a red circle"]]},
                                           "params": {"num_candidats": 4, "seed": 3}})
    assert typo.status_code == 400 and typo.json()["message"].endswith(  # MLflow names the data before it
        "num_candidats is not a param of this model; allowed: cond_scale, edit_mode, guidance_end, guidance_schedule, "
        "guidance_start, keep, negative_prompt, num_candidates, prime_rows, region, seed, temperature, top_k, top_p")
    guided = {"num_candidates": 4, "seed": 3, "cond_scale": 3.0}
    plain, steered = (http.post("/invocations", json={"dataframe_split": {"columns": ["prompt"], "data": [[
        "a red circle"]]}, "params": {**guided, **extra}}).json()["predictions"]
        for extra in ({}, {"negative_prompt": "a blue square", "guidance_schedule": "linear"}))
    assert [r["image"] for r in plain] != [r["image"] for r in steered]  # the MLflow params reach the sampler
    # the pipeline's end: `dalle run --register` registers the next version, which an alias then follows
    assert main(["run", "-c", str(TINY), *_sets(ov), "--only", "generate", "--register", "tiny-dalle",
                 "--alias", "champion"]) == 0
    printed = capsys.readouterr().out
    assert "registered models:/tiny-dalle/2" in printed and "alias champion: models:/tiny-dalle@champion" in printed
    assert str(client.get_model_version_by_alias("tiny-dalle", "champion").version) == "2"
    followed = load_model("models:/tiny-dalle@champion", tracking_uri=uri)("a red circle", num_candidates=4, seed=3)
    assert np.allclose(followed.scores[0], same.scores[0], atol=1e-5)  # the same models: the same candidates


@pytest.mark.parametrize("device", DEVICES)
def test_exported_model_runs_on_each_device(exported, device):
    pipe = DALLEPipeline.from_pretrained(exported, device=device)
    out = pipe(["a red circle"], num_candidates=3, seed=1)
    assert pipe.device.type == device and out.pixels[0].shape == (3, 32, 32, 3)
    assert all(np.diff(out.scores[0]) <= 0)

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from cli.main import main
from dalle_core.clip import CLIPReranker, recall_at
from dalle_core.errors import ConfigError
from dalle_core.images import decode_png
from pipeline.config import load_config
from pipeline.models import load_dvae, load_reranker
from pipeline.stage_table import stage_keys
from storage.parquet import read_shard, shard_paths
from tests.conftest import TINY, run_stage


def _table(store, key):
    return pq.read_table(store.path("generate", key, "generations.parquet"))


def _reranker(cfg):
    """The reranking CLIP the config's run uses (its clip stage's, or `clip.pretrained`)."""
    if cfg.clip.pretrained:  # no store: opening one would create the config's store folder
        return load_reranker(cfg, None, "")
    return load_reranker(cfg, cfg.store.open(), stage_keys(cfg)["clip"])


def _val_images(cfg, n: int = 40):
    store, keys = cfg.store.open(), stage_keys(cfg)
    table = read_shard(store, shard_paths(store, "ingest", keys["ingest"], "val")[0], ["caption", "image"])
    images = np.stack([decode_png(b) for b in table.column("image").to_pylist()[:n]])
    return images, table.column("caption").to_pylist()[:n]


def test_clip_recall_beats_chance_and_shuffled_captions_do_not(generated):
    _, ov, _ = generated
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    m = store.read_json(store.path("clip", stage_keys(cfg)["clip"], "metrics.json"))
    assert m["steps"] == 60
    scorer = _reranker(cfg)
    images, captions = _val_images(cfg)
    shuffled = [captions[(i + 7) % len(captions)] for i in range(len(captions))]  # every image gets another's
    emb_i = scorer.embed_images(images)
    true = recall_at(emb_i, scorer.embed_texts(captions), captions, ks=(5,))["val_i2t_recall_at_5"]
    wrong = recall_at(emb_i, scorer.embed_texts(shuffled), shuffled, ks=(5,))["val_i2t_recall_at_5"]
    chance = 5 / len(captions)
    assert true > chance + 0.2 and wrong < chance + 0.15, (true, wrong, chance)


def test_scorer_prefers_the_true_caption_of_real_images(generated):
    _, ov, _ = generated
    scorer = _reranker(load_config(TINY, ov))
    images, captions = _val_images(load_config(TINY, ov))
    others = [captions[(i + 7) % len(captions)] for i in range(len(captions))]
    keep = [i for i in range(len(captions)) if captions[i] != others[i]]
    true, mismatched = scorer.scores(images[keep], [captions[i] for i in keep]), \
        scorer.scores(images[keep], [others[i] for i in keep])
    assert (true > mismatched).float().mean() > 0.7, (true, mismatched)


def test_local_clip_checkpoint_gives_identical_scores(generated, tmp_path):
    _, ov, _ = generated
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    path = tmp_path / "my-clip.safetensors"
    path.write_bytes(store.read_bytes(store.path("clip", stage_keys(cfg)["clip"], "model.safetensors")))
    ours = _reranker(cfg)
    theirs = _reranker(load_config(TINY, [*ov, f"clip.pretrained={path}"]))
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square above a green diamond", "a small white triangle", "x"]
    assert np.array_equal(ours.scores(images, captions).numpy(), theirs.scores(images, captions).numpy())
    with pytest.raises(ConfigError, match="does not exist"):
        _reranker(load_config(TINY, [*ov, f"clip.pretrained={tmp_path}/nope.safetensors"]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_model_with_local_weights(tmp_path, suffix):
    """`clip.pretrained: <open_clip model>:<file>` goes through open_clip's own loader and scores exactly as the
    model that was saved."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    name = "dalle-test-tiny"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    weights = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), weights)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    loaded = _reranker(load_config(TINY, [f"clip.pretrained={name}:{weights}"]))
    in_memory = CLIPReranker(model, 32, open_clip.get_tokenizer(name))
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(loaded.scores(images, ["a cat", "a dog"]), in_memory.scores(images, ["a cat", "a dog"]))


def test_generation_writes_n_ranked_candidates_per_prompt(generated):
    _, ov, ref = generated
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    t = _table(store, ref.key).to_pylist()
    n = cfg.generate.num_candidates
    prompts = store.manifest("generate", ref.key)["prompts"]
    assert len(prompts) == cfg.generate.num_val_prompts and len(t) == n * len(prompts)
    for p in prompts:
        rows = [r for r in t if r["prompt"] == p]
        assert sorted(r["candidate"] for r in rows) == list(range(n))
        assert sorted(r["rank"] for r in rows) == list(range(n))
        by_rank = sorted(rows, key=lambda r: r["rank"])
        assert all(a["clip_score"] >= b["clip_score"] for a, b in zip(by_rank, by_rank[1:]))
        assert decode_png(rows[0]["image"]).shape == (32, 32, 3)
    files = store.manifest("generate", ref.key)["files"]
    assert "contact_sheet.png" in files and sum(f.startswith("grids/") for f in files) == len(prompts)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                                f"tags.stage = 'generate' and tags.stage_key = '{ref.key}' and tags.cached = 'false'")
    assert run.info.run_name == f"generate-{ref.key}"  # one name per stage: the run's name is <stage>-<key>
    assert {"clip_score_top1_mean", "clip_score_mean", "images_per_s"} <= set(run.data.metrics)


def test_same_seed_same_images_and_prompts_from_cli(generated, tmp_path, capsys):
    _, ov, _ = generated
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\na large blue square in the center\n")
    out = tmp_path / "out"
    args = ["generate", "-c", str(TINY), *sum((["--set", o] for o in ov), []), "a green diamond",
            "--prompts-file", str(prompts_file), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out / "generations.parquet") in printed and (out / "grids" / "prompt-0002.png").exists()
    first = pq.read_table(out / "generations.parquet")
    assert first.column("prompt").unique().to_pylist() == ["a green diamond", "a red circle",
                                                           "a large blue square in the center"]
    # Same config and seed from a clean store: the same images.
    cfg = load_config(TINY, [*ov, 'generate.prompts=["a green diamond", "a red circle", "a large blue square in the center"]'])
    store = cfg.store.open()
    store.remove("generate", stage_keys(cfg)["generate"])
    again = run_stage("generate", [*ov, 'generate.prompts=["a green diamond", "a red circle", '
                                        '"a large blue square in the center"]'])
    assert _table(store, again.key).column("image").equals(first.column("image"))


def test_empty_and_too_long_prompts(generated, capsys):
    _, ov, _ = generated
    with pytest.raises(ConfigError, match=r"^generate.prompts: prompt 2 of 2 is '  '; every prompt needs some text"):
        run_stage("generate", [*ov, 'generate.prompts=["a red circle", "  "]'])
    long = "a small red circle in the top left " * 4
    ref = run_stage("generate", [*ov, f'generate.prompts=["{long.strip()}"]'])
    cfg = load_config(TINY, ov)
    assert cfg.store.open().manifest("generate", ref.key)["truncated_prompts"] == [long.strip()]


def test_image_completion_keeps_the_prime_rows(generated, tmp_path, capsys, monkeypatch):
    """`dalle generate CAPTION --prime IMAGE --prime-rows K`: every candidate starts with the K token rows of
    the (resized) prime, the rest is sampled; the grid shows the prime and its reconstruction first."""
    import torch
    from PIL import Image

    from dalle_core.images import to_rgb_sized, to_tensor

    _, ov, _ = generated
    cfg = load_config(TINY, ov)
    images, captions = _val_images(cfg, 1)
    prime = tmp_path / "prime.png"
    Image.fromarray(images[0]).resize((48, 40)).save(prime)  # another size: resized and cropped to 32 px
    sets = sum((["--set", o] for o in ov), [])
    assert main(["generate", "-c", str(TINY), *sets, captions[0], "--prime", str(prime), "--prime-rows", "3"]) == 0
    cfg = load_config(TINY, [*ov, f'generate.prompts=["{captions[0]}"]', f"generate.prime_image={prime}",
                             "generate.prime_rows=3"])
    store, keys = cfg.store.open(), stage_keys(cfg)
    table = _table(store, keys["generate"])
    codes = np.stack(table.column("image_tokens").to_pylist())
    dvae, norm = load_dvae(store, keys["dvae"])
    with Image.open(prime) as im, torch.inference_mode():
        x = to_tensor(np.asarray(to_rgb_sized(im, 32))[None], norm.mean, norm.std)
        expected = dvae.encode(x)[0, :3].flatten().numpy()
    assert (codes[:, :24] == expected).all()  # 3 rows of the 8x8 grid, in every candidate
    assert len({c[24:].tobytes() for c in codes}) > 1  # the other rows are sampled
    assert set(table.column("prime").to_pylist()) == {f"{prime} (top 3 rows)"}
    sheet = decode_png(store.read_bytes(store.path("generate", keys["generate"], "grids", "prompt-0000.png")))
    assert sheet.shape[1] == (2 + cfg.generate.best_k) * (32 * 4 + 2)  # prime, recon, best_k completions
    assert main(["generate", "-c", str(TINY), *sets, "a red circle", "--prime", str(prime), "--prime-rows", "8"]) == 2
    assert capsys.readouterr().err == "error: --prime-rows is 8; allowed: 1 to 7\n"  # as with --model
    import tasks.generate

    models = tasks.generate.load_pipeline(cfg)
    monkeypatch.setattr(tasks.generate, "load_pipeline", lambda *_: models)
    cfg.generate.prime_rows = 8  # past the config's check, as with a pretrained dVAE (its grid is in its files)
    with pytest.raises(ConfigError, match="the dVAE's token grid has 8 rows, so use 1 to 7$"):
        tasks.generate.source_edit(cfg)
    assert set(table.column("mask").to_pylist()) == {"0" * 24 + "1" * 40}  # priming is the top-rows mask


def _source_codes(cfg, path) -> np.ndarray:
    """The dVAE codes of an image as the model sees it (resized, centre-cropped), flat."""
    import torch
    from PIL import Image

    from dalle_core.images import to_rgb_sized, to_tensor

    store, keys = cfg.store.open(), stage_keys(cfg)
    dvae, norm = load_dvae(store, keys["dvae"])
    with Image.open(path) as im, torch.inference_mode():
        return dvae.encode(to_tensor(np.asarray(to_rgb_sized(im, 32))[None], norm.mean, norm.std))[0].flatten().numpy()


def test_inpainting_from_the_cli_keeps_every_code_outside_the_region(generated, tmp_path):
    """`dalle generate CAPTION --edit IMAGE --region x0,y0,x1,y1`: every candidate keeps the source's codes outside
    the region (snapped outward to whole 4 px cells), so its decoded pixels there come from the same codes; the
    parquet records the edit, the source and the mask, the grid shows the source and the mask first, and the
    stage key follows the image's content, not its path."""
    import shutil

    from PIL import Image

    from dalle_core.editing import pack, unpack

    _, ov, _ = generated
    images, captions = _val_images(load_config(TINY, ov), 2)
    source = tmp_path / "source.png"
    Image.fromarray(images[1]).resize((40, 32)).save(source)
    sets = sum((["--set", o] for o in ov), [])
    assert main(["generate", "-c", str(TINY), *sets, captions[1], "--edit", str(source), "--region", "5,4,18,13"]) == 0
    edit = [f'generate.prompts=["{captions[1]}"]', "generate.edit_mode=inpaint", f"generate.edit_image={source}",
            "generate.edit_region=[5,4,18,13]"]
    cfg = load_config(TINY, [*ov, *edit])
    store, keys = cfg.store.open(), stage_keys(cfg)
    table = _table(store, keys["generate"])
    codes = np.stack(table.column("image_tokens").to_pylist())
    mask = np.zeros((8, 8), bool)
    mask[1:4, 1:5] = True  # x 5-18 -> cells 1-4, y 4-13 -> rows 1-3
    kept = _source_codes(cfg, source)
    assert (codes[:, ~mask.reshape(-1)] == kept[~mask.reshape(-1)]).all()
    assert (codes[:, mask.reshape(-1)] != kept[mask.reshape(-1)]).any()  # the region is redrawn
    assert set(table.column("mask").to_pylist()) == {pack(mask)} and np.array_equal(unpack(pack(mask), 8), mask)
    assert set(table.column("edit").to_pylist()) == {"inpaint"}
    (recorded,) = set(table.column("source").to_pylist())
    assert recorded.startswith(f"{source} (sha256 ") and len(recorded.split("sha256 ")[1]) == 17  # 16 hex + ")"
    sheet = decode_png(store.read_bytes(store.path("generate", keys["generate"], "grids", "prompt-0000.png")))
    assert sheet.shape[1] == (2 + cfg.generate.best_k) * (32 * 4 + 2)  # source, its sampled cells, best_k
    moved = tmp_path / "moved.png"
    shutil.copy(source, moved)
    assert stage_keys(load_config(TINY, [*ov, *edit[:2], f"generate.edit_image={moved}", edit[3]]))["generate"] \
        == keys["generate"]
    assert stage_keys(load_config(TINY, [*ov, *edit[:3], "generate.edit_region=[5,4,18,17]"]))["generate"] \
        != keys["generate"]
    Image.fromarray(images[0]).save(moved)
    assert stage_keys(load_config(TINY, [*ov, *edit[:2], f"generate.edit_image={moved}", edit[3]]))["generate"] \
        != keys["generate"]


def test_outpainting_and_variations_with_an_exported_model(generated, tmp_path):
    """`dalle generate --model DIR --outpaint IMAGE --region ...` keeps the codes of the box the image is placed
    in; `--variations IMAGE --keep 0.5` keeps half the cells of each candidate, drawn per candidate from (seed,
    candidate), and writes the same rows as the generate stage (`-c`) for the same prompt and seed."""
    from PIL import Image

    from dalle_core.editing import random_mask, unpack
    from tests.flows.exported_model import exported_folder

    tmp, ov, _ = generated
    folder = str(exported_folder(str(tmp), tuple(ov)))
    images, captions = _val_images(load_config(TINY, ov), 1)
    source = tmp_path / "source.png"
    Image.fromarray(images[0]).save(source)
    out = tmp_path / "outpaint"
    assert main(["generate", "--model", folder, captions[0], "--outpaint", str(source), "--region", "8,8,24,24",
                 "--out", str(out)]) == 0
    table = pq.read_table(out / "generations.parquet").to_pylist()
    box = np.zeros((8, 8), bool)
    box[2:6, 2:6] = True
    assert {r["edit"] for r in table} == {"outpaint"} and all(np.array_equal(unpack(r["mask"], 8), ~box) for r in table)
    placed = np.zeros((32, 32, 3), np.uint8)
    placed[8:24, 8:24] = np.asarray(Image.open(source).resize((16, 16), Image.BICUBIC))
    Image.fromarray(placed).save(tmp_path / "placed.png")
    kept = _source_codes(load_config(TINY, ov), tmp_path / "placed.png")[box.reshape(-1)]
    assert all((np.array(r["image_tokens"])[box.reshape(-1)] == kept).all() for r in table)
    out = tmp_path / "variations"
    assert main(["generate", "--model", folder, captions[0], "--variations", str(source), "--keep", "0.5",
                 "--out", str(out)]) == 0
    table = pq.read_table(out / "generations.parquet").to_pylist()
    kept = _source_codes(load_config(TINY, ov), source)
    masks = [unpack(r["mask"], 8).reshape(-1) for r in table]
    assert all((~m).sum() == 32 for m in masks) and len({m.tobytes() for m in masks}) == len(masks)
    assert all((np.array(r["image_tokens"])[~m] == kept[~m]).all() for r, m in zip(table, masks))
    # `candidate` is the sampling index c (its mask drawn from (seed, c)), not the rank, and the rows are the
    # generate stage's own for the same prompt and seed
    assert [r["rank"] for r in table] != list(range(len(table)))  # CLIP's order differs from sampling order
    assert all(np.array_equal(m, random_mask(8, 0.5, r["seed"], r["candidate"]).reshape(-1))
               for r, m in zip(table, masks))
    sets = sum((["--set", o] for o in ov), [])
    assert main(["generate", "-c", str(TINY), *sets, captions[0], "--variations", str(source), "--keep", "0.5",
                 "--out", str(tmp_path / "stage")]) == 0
    stage = pq.read_table(tmp_path / "stage" / "generations.parquet").to_pylist()
    assert [(r["candidate"], r["rank"], r["mask"], list(r["image_tokens"])) for r in table] == \
        [(r["candidate"], r["rank"], r["mask"], list(r["image_tokens"])) for r in stage]


def _edit_errors(tmp_path) -> list[tuple[list[str], str]]:
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    Image.new("L", (20, 20), 255).save(tmp_path / "small.png")
    Image.new("L", (40, 30), 0).save(tmp_path / "black.png")
    Image.new("L", (40, 30), 255).save(tmp_path / "white.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    i, t = str(img), str(tmp_path)
    return [
        (["--edit", i, "--region", "0,0,40,8"], "--region 0,0,40,8 is outside the 32x32 image (pixels of the image "
                                                "resized to the model's 32 px)"),
        (["--edit", i, "--region", "9,0,9,8"], "--region 9,0,9,8 is empty: x0=9 must be less than x1=9"),
        (["--edit", i, "--region", "0,0,8"], "--region is '0,0,8'; expected x0,y0,x1,y1"),
        (["--edit", i, "--region", "1,0,32,31"], "--region covers all 64 token cells, so nothing of the image is kept"),
        (["--outpaint", i, "--region", "0,0,29,32"], "--region covers all 64 token cells, so nothing is left to outpaint"),
        (["--edit", i, "--mask", f"{t}/small.png"], "--mask is 20x20 pixels but --edit is 40x30"),
        (["--edit", i, "--mask", f"{t}/black.png"], "error: --mask is all black (nothing to regenerate); paint"),
        (["--edit", i, "--mask", f"{t}/white.png"], "error: --mask is all white (all regenerated, nothing kept); paint"),
        (["--edit", f"{t}/junk.png", "--region", "0,0,4,4"], f"--edit '{t}/junk.png' is not an image file"),
        (["--edit", f"{t}/none.png", "--region", "0,0,4,4"], f"--edit '{t}/none.png' does not exist"),
        (["--edit", i, "--mask", f"{t}/junk.png"], f"--mask '{t}/junk.png' is not an image file"),
        (["--variations", i, "--keep", "1.5"], "--keep is 1.5; allowed: a number more than 0 and less than 1"),
        (["--variations", i, "--keep", "0"], "--keep is 0; allowed: a number more than 0 and less than 1"),
        (["--variations", i, "--keep", "abc"], "--keep is 'abc'; allowed: a number more than 0 and less than 1"),
        (["--variations", i, "--keep", "-0.5"], "--keep is -0.5; allowed: a number more than 0 and less than 1"),
        (["--variations", i, "--keep", "-.5,"], "--keep is '-.5,'; allowed: a number more than 0 and less than 1"),
        (["--edit", i, "--region", "-4,0,8,8"], "error: --region -4,0,8,8 is outside the 32x32 image"),
        (["--edit", i, "--region", "-4,0,8"], "error: --region is '-4,0,8'; expected x0,y0,x1,y1"),
        (["--edit", i, "--region", "0,0,4,4", "--mask", f"{t}/black.png"],
         "error: --region and --mask were both given; give one of them"),
        (["--prime", i, "--prime-rows", "-1"], "error: --prime-rows is -1; allowed: 1 to 7"),
        (["--prime", i, "--prime-rows", "0"], "error: --prime-rows is 0; allowed: 1 to 7"),
        (["--prime", i, "--prime-rows", "8"], "error: --prime-rows is 8; allowed: 1 to 7"),
        (["--prime-rows", "3"], "error: --prime-rows is 3 but no --prime image was given"),
        (["--edit", i, "--prime", i, "--region", "0,0,4,4"], "--prime and --edit were both given; give one of --prime, "
                                                             "--edit, --outpaint, --variations"),
        (["--region", "0,0,4,4"], "--region is '0,0,4,4' but no --edit or --outpaint was given"),
        (["--outpaint", i, "--region", "0,0,4,4", "--mask", f"{t}/black.png"], "but no --edit was given"),
        (["--edit", i, "--keep", "0.5", "--region", "0,0,4,4"], "--keep is 0.5 but no --variations was given"),
        (["--edit", i], "--edit needs --region x0,y0,x1,y1 or --mask"),
        (["--outpaint", i], "--outpaint needs --region x0,y0,x1,y1"),
    ]


def test_bad_edit_flags_are_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    """Each bad editing flag fails in one line naming it, before a Prefect server starts or a store is opened."""
    import cli.main

    monkeypatch.setattr(cli.main, "check_prefect_server", lambda: pytest.fail("started Prefect"))
    monkeypatch.setattr(cli.main, "check_store", lambda cfg: pytest.fail("opened the store"))
    config, make = tiny
    for flags, message in _edit_errors(tmp_path):
        assert main(["generate", "-c", config, *sum((["--set", o] for o in make()), []), "a red circle", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_bad_edit_flags_with_a_model_fail_before_it_loads(generated, tmp_path, capsys, monkeypatch):
    import pipeline.models
    from tests.flows.exported_model import exported_folder

    tmp, ov, _ = generated
    folder = str(exported_folder(str(tmp), tuple(ov)))
    monkeypatch.setattr(pipeline.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for flags, message in _edit_errors(tmp_path):
        assert main(["generate", "--model", folder, "a red circle", "--out", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_val_prompts_take_each_subset_in_turn(tmp_path):
    """Evaluation and generation prompts take val rows from each subset in turn (a subset listed after a long one
    still gets its share), in stored order across shards, and fall back to the first rows without subsets."""
    import pyarrow as pa

    from storage.parquet import IMAGES_SCHEMA, shard_name, val_rows, write_shard
    from storage.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))

    def write(key, shards):
        for i, rows in enumerate(shards):
            table = pa.Table.from_pylist([{"id": c, "caption": c, "image": b"", "subset": s} for c, s in rows],
                                         schema=IMAGES_SCHEMA)
            write_shard(store, store.path("ingest", key, "val", shard_name(i)), table)

    unseen = [(f"u{i}", "unseen") for i in range(30)]
    variant = [("v0", "seen-variant"), ("u3", "seen-variant"), ("v1", "seen-variant"), ("v2", "seen-variant")]
    write("k", [unseen[:20], unseen[20:] + variant])
    rows = val_rows(store, "k", 8)
    assert rows["caption"] == ["u0", "v0", "u1", "u3", "u2", "v1", "u3", "v2"]
    assert rows["subset"] == ["unseen", "seen-variant"] * 4
    assert val_rows(store, "k", 8, distinct=True)["caption"] == ["u0", "v0", "u1", "v1", "u2", "v2", "u3", "u4"]
    assert val_rows(store, "k", 100)["caption"][-22:] == [f"u{i}" for i in range(8, 30)]

    # a caption in a full subset's rows does not keep a later subset from taking it
    write("full", [[(f"a{i}", "A") for i in range(5)] + [("x", "A"), ("x", "B"), ("b1", "B")]])
    rows = val_rows(store, "full", 4, distinct=True)
    assert rows["caption"] == ["a0", "x", "a1", "b1"] and rows["subset"] == ["A", "B", "A", "B"]

    write("plain", [[(f"c{i}", None) for i in range(10)]])
    assert val_rows(store, "plain", 4) == {"caption": ["c0", "c1", "c2", "c3"], "subset": ["val"] * 4}

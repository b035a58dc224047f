import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

import pipeline.training
from dalle_core.images import decode_png, psnr, to_tensor
from pipeline.config import load_config
from pipeline.models import load_dvae, load_tokenizer
from pipeline.stage_table import stage_keys
from storage.parquet import read_shard, shard_paths
from tests.conftest import TINY, run_stage


@pytest.fixture(scope="module")
def done(pretokenized):
    tmp, ov, ref = pretokenized
    return load_config(TINY, ov), ov, ref, tmp


def test_token_shards_match_dvae_encode(done):
    cfg, _, ref, _ = done
    store, keys = cfg.store.open(), stage_keys(cfg)
    model, norm = load_dvae(store, keys["dvae"])
    for split in ("train", "val"):
        for img_path, tok_path in zip(shard_paths(store, "ingest", keys["ingest"], split),
                                      shard_paths(store, "pretokenize", ref.key, split), strict=True):
            images, tokens = read_shard(store, img_path), read_shard(store, tok_path)
            assert tokens.column("id").to_pylist() == images.column("id").to_pylist()
            pixels = np.stack([decode_png(b) for b in images.column("image").to_pylist()])
            with torch.inference_mode():
                expect = model.encode(to_tensor(pixels, norm.mean, norm.std)).flatten(1).numpy()
            got = np.stack(tokens.column("image_tokens").to_numpy(zero_copy_only=False))
            assert np.array_equal(got, expect)


def test_token_schema_and_manifest(done):
    cfg, _, ref, _ = done
    store, keys = cfg.store.open(), stage_keys(cfg)
    m = store.manifest("pretokenize", ref.key)
    assert m["rows"] == {"train": 360, "val": 40}
    assert m["grid"] == [8, 8] and m["codebook_size"] == 64 and m["text_len"] == 16
    assert m["dvae_key"] == keys["dvae"] and m["bpe_key"] == keys["bpe"]
    tok = load_tokenizer(store, keys["bpe"], 16)
    assert m["vocab_size"] == tok.vocab_size
    t = read_shard(store, shard_paths(store, "pretokenize", ref.key, "train")[0])
    assert t.schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    assert t.schema.field("text_tokens").type == pa.list_(pa.uint16())
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["text_tokens"]) == 16
    assert tok.decode(row["text_tokens"]) == row["caption"]


def test_token_shards_readable_by_other_clients(done):
    cfg, _, ref, _ = done
    store = cfg.store.open()
    base = store.path("pretokenize", ref.key)
    table = pads.dataset(f"{base}/train", format="parquet").to_table()
    assert table.num_rows == 360
    ds = datasets.load_dataset("parquet", data_files={"train": f"{base}/train/*.parquet",
                                                      "val": f"{base}/val/*.parquet"})
    assert ds["train"].num_rows == 360 and ds["val"].num_rows == 40
    assert len(ds["val"][0]["image_tokens"]) == 64


def test_dvae_stage_tracked_and_reused(done):
    cfg, ov, _, _ = done
    store, keys = cfg.store.open(), stage_keys(cfg)
    m = store.manifest("dvae", keys["dvae"])
    assert m["steps"] == 30 and {"model.safetensors", "config.json", "reconstructions.png"} <= set(m["files"])
    assert not any(f.startswith("checkpoints/") for f in m["files"])
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    run = client.search_runs([exp], "tags.stage = 'dvae' and tags.cached = 'false'")[0]
    for metric in ("loss", "recon_mse", "psnr", "perplexity", "code_usage_fraction", "lr", "images_per_s", "val_psnr"):
        assert metric in run.data.metrics, metric
    assert [h.step for h in client.get_metric_history(run.info.run_id, "loss")] == [10, 20, 30]
    assert run_stage("dvae", ov).cached
    reused = client.search_runs([exp], "tags.stage = 'dvae' and tags.cached = 'true'")
    assert reused and {r.data.tags["source_run_id"] for r in reused} == {run.info.run_id}


def test_crash_after_one_shard_then_rerun_is_identical(done):
    cfg, ov, ref, tmp = done
    store = cfg.store.open()
    clean = {p: store.read_bytes(p) for s in ("train", "val") for p in shard_paths(store, "pretokenize", ref.key, s)}
    # Simulate a crash: only the first shard and a half-written temporary file survive.
    crashed_root = tmp / "crashed"
    shutil.copytree(store.root, crashed_root)
    ov2 = [f"store.root={crashed_root}", *ov[1:]]
    cfg2 = load_config(TINY, ov2)
    store2 = cfg2.store.open()
    paths2 = sorted(p for s in ("train", "val") for p in shard_paths(store2, "pretokenize", ref.key, s))
    for p in paths2[1:]:
        store2.fs.rm(p)
    store2.fs.rm(store2.path("pretokenize", ref.key, "manifest.json"))
    store2.write_bytes(store2.path("pretokenize", ref.key, "train", ".tmp-x-part-00001.parquet"), b"half")
    kept_mtime = store2.fs.modified(paths2[0])
    again = run_stage("pretokenize", ov2)
    assert not again.cached and store2.is_complete("pretokenize", ref.key)
    assert store2.fs.modified(paths2[0]) == kept_mtime  # the finished shard was not redone
    redone = {p.replace(str(crashed_root), store.root): store2.read_bytes(p)
              for s in ("train", "val") for p in shard_paths(store2, "pretokenize", ref.key, s)}
    assert redone == clean
    assert not [p for p in store2.fs.find(store2.path("pretokenize", ref.key)) if ".tmp-" in p]


def test_bpe_truncates_and_accepts_existing_tokenizer(done, tmp_path):
    cfg, ov, _, _ = done
    store, keys = cfg.store.open(), stage_keys(cfg)
    tok = load_tokenizer(store, keys["bpe"], 4)
    ids, truncated = tok.encode(["a large red circle in the top left", "a"])
    assert ids.shape == (2, 4) and truncated.tolist() == [True, False]
    assert (ids[1, 1:] == tok.pad_id).all()
    path = tmp_path / "tokenizer.json"
    path.write_bytes(store.read_bytes(store.path("bpe", keys["bpe"], "tokenizer.json")))
    ref = run_stage("bpe", [*ov, f"text.tokenizer_path={path}"])
    assert ref.key != keys["bpe"]
    assert store.read_bytes(store.path("bpe", ref.key, "tokenizer.json")) == path.read_bytes()


def test_killed_dvae_training_resumes_from_checkpoint(tiny, monkeypatch):
    config, make = tiny
    ov = make()
    real_save = pipeline.training.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated kill after the first checkpoint")

    monkeypatch.setattr(pipeline.training, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_stage("dvae", ov, config)
    cfg = load_config(config, ov)
    store, key = cfg.store.open(), stage_keys(cfg)["dvae"]
    assert not store.is_complete("dvae", key)
    assert store.read_json(store.path("dvae", key, "checkpoints", "latest.json"))["step"] == 15
    monkeypatch.setattr(pipeline.training, "save_checkpoint", real_save)
    ref = run_stage("dvae", ov, config)
    assert not ref.cached and store.manifest("dvae", key)["steps"] == 30
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                              "tags.stage = 'dvae'", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.tags["resumed_from_step"] == "15"
    assert [h.step for h in client.get_metric_history(runs[1].info.run_id, "loss")] == [20, 30]


def test_bf16_encode_is_its_own_tokens_artifact(done):
    """dvae.encode_precision=bf16 keeps the dVAE (same key), writes tokens under a new key, equal to encode(bf16)."""
    cfg, ov, ref, tmp = done
    root = tmp / "bf16"
    shutil.copytree(cfg.store.open().root, root)
    ov2 = [f"store.root={root}", *ov[1:], "dvae.encode_precision=bf16"]
    cfg2 = load_config(TINY, ov2)
    keys, keys2 = stage_keys(cfg), stage_keys(cfg2)
    assert keys2["dvae"] == keys["dvae"] and keys2["pretokenize"] != keys["pretokenize"]
    out = run_stage("pretokenize", ov2)
    assert not out.cached and out.key == keys2["pretokenize"]
    store = cfg2.store.open()
    model, norm = load_dvae(store, keys["dvae"])
    images = read_shard(store, shard_paths(store, "ingest", keys["ingest"], "train")[0])
    pixels = to_tensor(np.stack([decode_png(b) for b in images.column("image").to_pylist()]), norm.mean, norm.std)
    with torch.inference_mode():
        fp32, bf16 = model.encode(pixels).flatten(1).numpy(), model.encode(pixels, "bf16").flatten(1).numpy()
    got = np.stack(read_shard(store, shard_paths(store, "pretokenize", out.key, "train")[0])
                   .column("image_tokens").to_numpy(zero_copy_only=False))
    assert np.array_equal(got, bf16)
    assert (got == fp32).mean() > 0.8  # near-tie cells may take a neighbouring code
    with torch.inference_mode():
        recon = {k: norm.to_unit(model.decode(torch.from_numpy(c).long().view(-1, *model.c.grid_hw))) for k, c in (("fp32", fp32), ("bf16", bf16))}
        recon_psnr = {k: psnr(F.mse_loss(r, norm.to_unit(pixels)).item()) for k, r in recon.items()}
    assert abs(recon_psnr["bf16"] - recon_psnr["fp32"]) < 0.1, recon_psnr  # same reconstruction quality
    assert store.read_json(store.path("pretokenize", out.key, "manifest.json"))["config"]["encode_precision"] == "bf16"


def test_dvae_and_clip_train_under_torchrun(tiny):
    """The dVAE (its VQ codebook statistics all-reduced) and CLIP (features gathered across ranks) through the
    same DDP launcher as the transformer."""
    config, make = tiny
    ov = make("dvae.train.nproc=2", "dvae.train.max_steps=20", "clip.train.nproc=2", "clip.train.max_steps=10")
    dvae_ref = run_stage("dvae", ov, config)
    clip_ref = run_stage("clip", ov, config)
    cfg = load_config(config, ov)
    store = cfg.store.open()
    dvae_m, clip_m = store.manifest("dvae", dvae_ref.key), store.manifest("clip", clip_ref.key)
    assert dvae_m["world_size"] == 2 and dvae_m["steps"] == 20 and clip_m["world_size"] == 2
    assert dvae_m["metrics"]["val_psnr"] > 9  # it learned: an untrained dVAE gives 6.1 dB on these images


def test_pixel_kmeans_tokenizer_through_the_stages(store_copy):
    """`dvae.quantizer=pixel-kmeans`: the dVAE stage runs k-means instead of gradient steps (one mse point
    per round in MLflow), and pre-tokenization uses it like any dVAE."""
    ov = [*store_copy, "dvae.quantizer=pixel-kmeans", "dvae.codebook_size=32", "dvae.kmeans_images=128",
          "dvae.kmeans_iters=4"]
    run_stage("pretokenize", ov)
    cfg = load_config(TINY, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    dvae_m = store.manifest("dvae", keys["dvae"])
    assert dvae_m["steps"] == 4 and dvae_m["metrics"]["val_psnr"] > 18, dvae_m["metrics"]
    tokens_m = store.manifest("pretokenize", keys["pretokenize"])
    assert tokens_m["grid"] == [8, 8] and tokens_m["codebook_size"] == 32
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                             "tags.stage = 'dvae' and tags.cached = 'false'")[0]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "kmeans_mse")] == [1, 2, 3, 4]


def test_pretrained_tokenizer_through_the_stages(store_copy, tmp_path):
    """`dvae.pretrained`: the dVAE stage loads OpenAI-format files instead of training, keys and records them by
    content, and pre-tokenization writes exactly the upstream encoder's codes."""
    import hashlib

    from dall_e import map_pixels

    from tests.core.test_pretrained import openai_dvae

    enc, _ = openai_dvae(tmp_path / "dalle")
    ov = [*store_copy, f"dvae.pretrained={tmp_path / 'dalle'}"]
    run_stage("pretokenize", ov)
    cfg = load_config(TINY, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    dvae_m = store.manifest("dvae", keys["dvae"])
    digest = hashlib.sha256((tmp_path / "dalle" / "encoder.pkl").read_bytes()).hexdigest()[:16]
    assert dvae_m["pretrained"]["kind"] == "openai" and dvae_m["steps"] == 0
    assert dvae_m["pretrained"]["files"]["encoder"]["sha256"] == digest
    tokens_m = store.manifest("pretokenize", keys["pretokenize"])
    assert tokens_m["grid"] == [4, 4] and tokens_m["codebook_size"] == 512
    images = read_shard(store, shard_paths(store, "ingest", keys["ingest"], "val")[0])
    tokens = read_shard(store, shard_paths(store, "pretokenize", keys["pretokenize"], "val")[0])
    pixels = torch.from_numpy(np.stack([decode_png(b) for b in images.column("image").to_pylist()]))
    with torch.no_grad():
        want = enc(map_pixels(pixels.permute(0, 3, 1, 2).float() / 255)).argmax(1).flatten(1).numpy()
    assert np.array_equal(np.stack(tokens.column("image_tokens").to_numpy(zero_copy_only=False)), want)
    model, _ = load_dvae(store, keys["dvae"])  # what generation decodes with: rebuilt from the artifact alone
    assert model.decode(torch.as_tensor(want[:2]).view(2, 4, 4)).shape == (2, 3, 32, 32)
    openai_dvae(tmp_path / "dalle", seed=1)  # other weights at the same path: another tokenizer, another key
    assert stage_keys(load_config(TINY, ov))["dvae"] != keys["dvae"]


@pytest.mark.parametrize("kind", ["openai", "taming-vq"])
def test_fine_tuning_a_loaded_tokenizer(store_copy, tmp_path, kind):
    """`dvae.init_from` on OpenAI's or taming's files: the tokenizer trains on the run's images in its own
    architecture (its val PSNR rises above the loaded one's), the key follows the files' content, the manifest
    and MLflow name the source, and pre-tokenization encodes with the fine-tuned weights."""
    from dalle_core import pretrained
    from dalle_core.dvae import evaluate_dvae
    from dalle_core.images import ImageNormalization
    from tests.core.test_pretrained import openai_dvae, taming_vqgan

    if kind == "openai":
        source, ov = tmp_path / "dalle", ["dvae.recon_loss=logit_laplace", "dvae.temp_start=0.0625"]
        openai_dvae(source)
    else:
        source, ov = tmp_path / "vqgan", []
        taming_vqgan(source, "VQModel")
    ov = [*store_copy, f"dvae.init_from={source}", "dvae.train.max_steps=20", "dvae.train.batch_size=8",
          "dvae.train.lr=1e-3", *ov]
    run_stage("pretokenize", ov)
    cfg = load_config(TINY, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    manifest = store.manifest("dvae", keys["dvae"])
    assert manifest["steps"] == 20 and manifest["init_from"]["kind"] == "upstream"
    tuned, norm = load_dvae(store, keys["dvae"])
    assert tuned.spec.kind == kind  # rebuilt from the artifact alone, in the loaded tokenizer's architecture
    images = read_shard(store, shard_paths(store, "ingest", keys["ingest"], "val")[0])
    pixels = torch.from_numpy(np.stack([decode_png(b) for b in images.column("image").to_pylist()]))
    loaded = pretrained.load(source, None, 32, cfg.dvae.norm_mean, cfg.dvae.norm_std)
    before = evaluate_dvae(loaded, [{"image": pixels}], ImageNormalization(cfg.dvae.norm_mean, cfg.dvae.norm_std))
    assert manifest["metrics"]["val_psnr"] > before["val_psnr"] + 1, (before, manifest["metrics"])
    tokens = read_shard(store, shard_paths(store, "pretokenize", keys["pretokenize"], "val")[0])
    with torch.inference_mode():
        want = tuned.encode(to_tensor(pixels, norm.mean, norm.std)).flatten(1).numpy()
    assert np.array_equal(np.stack(tokens.column("image_tokens").to_numpy(zero_copy_only=False)), want)
    run = MlflowClient(cfg.tracking.uri).search_runs(
        [MlflowClient(cfg.tracking.uri).get_experiment_by_name("dalle").experiment_id],
        "tags.stage = 'dvae' and tags.cached = 'false'")[0]
    assert run.data.tags["init_from.kind"] == "upstream" and run.data.tags["init_from"] == str(source)
    unused = stage_keys(load_config(TINY, [*ov, "dvae.hidden=8", "dvae.codebook_size=128", "dvae.quantizer=gumbel"]))
    assert unused["dvae"] == keys["dvae"]  # the files decide the architecture: the section's fields are unused
    if kind == "openai":
        openai_dvae(source, seed=1)  # other weights at the same path: another source, another key
        assert stage_keys(load_config(TINY, ov))["dvae"] != keys["dvae"]


def test_a_loaded_tokenizer_that_cannot_fine_tune_is_one_line(store_copy, tmp_path):
    """Before any work: OpenAI's decoder gives logit-Laplace statistics, so an MSE fine-tune of it is refused in
    one line naming the key to set; a missing checkpoint names itself."""
    from dalle_core.errors import ConfigError
    from tests.core.test_pretrained import openai_dvae

    openai_dvae(tmp_path / "dalle")
    ov = [*store_copy, f"dvae.init_from={tmp_path / 'dalle'}"]
    with pytest.raises(ConfigError, match=r"^dvae.init_from .* OpenAI's dVAE.* set dvae.recon_loss=logit_laplace$"):
        run_stage("dvae", ov)
    cfg = load_config(TINY, ov)
    assert not cfg.store.open().exists(cfg.store.open().path("dvae", stage_keys(cfg)["dvae"]))  # nothing began
    with pytest.raises(ConfigError, match=r"^dvae.init_from: \S*nope.ckpt does not exist; give a folder"):
        run_stage("dvae", [*store_copy, f"dvae.init_from={tmp_path / 'nope.ckpt'}"])
    (tmp_path / "damaged").mkdir()
    for name in ("encoder.pkl", "decoder.pkl"):  # damaged files: the key and the file, not a library's trace
        (tmp_path / "damaged" / name).write_bytes(b"garbage\n")
    with pytest.raises(ConfigError, match=r"^dvae.init_from: cannot read \S*encoder.pkl as a checkpoint: [^\n]*$"):
        run_stage("dvae", [*store_copy, f"dvae.init_from={tmp_path / 'damaged'}", "dvae.recon_loss=logit_laplace"])


def test_vqgan_through_the_dvae_stage(store_copy, tmp_path):
    """`dvae.adversarial`: LPIPS from local weights from the first step, the discriminator's terms from
    disc_start on, and an artifact that is the tokenizer alone; without VGG weights the run says LPIPS is off."""
    import torchvision
    from safetensors.torch import load

    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")  # random weights: nothing can be downloaded here
    ov = [*store_copy, "dvae.adversarial=true", "dvae.disc_start=6", "dvae.disc_layers=2",
          f"dvae.perceptual_vgg={tmp_path / 'vgg16.pth'}", "dvae.train.max_steps=12", "dvae.train.batch_size=8",
          "dvae.train.log_every=3"]
    run_stage("dvae", ov)
    cfg = load_config(TINY, ov)
    store, key = cfg.store.open(), stage_keys(cfg)["dvae"]
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("dalle").experiment_id], f"tags.stage_key = '{key}'")[0]
    steps = {m: [h.step for h in client.get_metric_history(run.info.run_id, m)]
             for m in ("perceptual", "discriminator_loss", "adaptive_weight")}
    assert steps == {"perceptual": [3, 6, 9, 12], "discriminator_loss": [9, 12], "adaptive_weight": [9, 12]}
    assert run.data.tags["perceptual"] == "on, weight 1.0"
    state = load(store.read_bytes(store.path("dvae", key, "model.safetensors")))
    assert state and not any(k.startswith("discriminator") for k in state)
    model, _ = load_dvae(store, key)
    assert model.discriminator is None and model.c.disc_layers == 0
    off = [*store_copy, "dvae.adversarial=true", "dvae.train.max_steps=2"]
    run_stage("dvae", off)
    cfg = load_config(TINY, off)
    run = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                             f"tags.stage_key = '{stage_keys(cfg)['dvae']}'")[0]
    assert run.data.tags["perceptual"].startswith("off: dvae.perceptual_vgg is not set")

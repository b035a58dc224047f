"""DALL-E's own shape end to end on CPU: configs/dalle-256.yaml with tiny widths and a few steps per stage."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image

from cli.main import main
from pipeline.config import load_config
from pipeline.models import load_transformer
from pipeline.stage_table import stage_keys
from tests.conftest import DEVICES, ROOT

CONFIG = str(ROOT / "configs" / "dalle-256.yaml")
TINY_WIDTHS = [
    "data.shapes.num_images=40", "data.val_fraction=0.15", "data.shard_size=16",
    "dvae.hidden=8", "dvae.codebook_dim=16", "dvae.num_res_blocks=0", "dvae.shuffle_buffer=8",
    "dvae.train={batch_size: 4, max_steps: 2, warmup_steps: 1, log_every: 1, precision: bf16}",
    "transformer.dim=32", "transformer.depth=1", "transformer.heads=2", "transformer.shuffle_buffer=8",
    "transformer.train={batch_size: 2, max_steps: 2, warmup_steps: 1, log_every: 1, precision: bf16}",
    "clip.embed_dim=16", "clip.vision_width=16", "clip.vision_layers=1", "clip.patch_size=64", "clip.text_width=16",
    "clip.text_heads=2", "clip.text_layers=1", "clip.shuffle_buffer=8",
    "clip.train={batch_size: 8, max_steps: 2, warmup_steps: 1, log_every: 1}",
    "generate.num_val_prompts=1", "generate.num_candidates=2", "generate.best_k=1", "generate.batch_size=2",
    "evaluate.num_prompts=1", "evaluate.num_candidates=2", "evaluate.train_prompts=1", "runner.loader_workers=0",
]


@pytest.mark.parametrize("device", DEVICES)
def test_dalle_256_config_runs_end_to_end_at_its_own_shape(tmp_path, capsys, device):
    ov = [*TINY_WIDTHS, f"runner.device={device}", f"store.root={tmp_path / 'store'}",
          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["run", "-c", CONFIG, *sum((["--set", o] for o in ov), [])]) == 0
    cfg = load_config(CONFIG, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    tokens = store.manifest("pretokenize", keys["pretokenize"])
    assert tokens["grid"] == [32, 32] and tokens["codebook_size"] == 8192 and tokens["text_len"] == 256
    model = load_transformer(store, keys["transformer"])
    assert model.c.text_len + model.c.image_len == 1280 and model.c.image_vocab == 8192
    assert store.manifest("transformer", keys["transformer"])["steps"] == 2
    table = pq.read_table(store.path("generate", keys["generate"], "generations.parquet"))
    assert table.num_rows == 2 and cfg.generate.cond_scale == 3.0  # sampled with guidance
    for png in table.column("image").to_pylist():
        assert Image.open(io.BytesIO(png)).size == (256, 256)
    rows = pq.read_table(store.path("pretokenize", keys["pretokenize"], "train")).column("image_tokens")
    codes = np.stack(rows.to_numpy(zero_copy_only=False))
    assert codes.shape[1] == 1024 and codes.max() < 8192
    assert "evaluation" in capsys.readouterr().out
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("dalle").experiment_id], "tags.stage != 'pipeline'")
    trained = {r.data.tags["stage"]: r.data.tags.get("device") for r in runs if "device" in r.data.tags}
    assert set(trained) == {"dvae", "transformer", "clip"}
    assert all(d.startswith(device) for d in trained.values()), trained

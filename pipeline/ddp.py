"""One DDP rank of a training stage, started by `pipeline.torchrun.launch_ranks` as `python -m pipeline.ddp
<stage.json>`: it reads the stage's `StageTrainer` class (module:name), the run config, its inputs' artifacts and
the pipeline's MLflow run from that file and trains its share."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from dalle_core.device import resolve_device
from pipeline.artifacts import ArtifactRef, Work, stage_key
from pipeline.config import config_from_dict
from pipeline.runs import PARENT_RUN
from pipeline.torchrun import RANK_PREFIX


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    module, name = spec["trainer"].split(":")
    trainer, cfg = getattr(importlib.import_module(module), name), config_from_dict(spec["config"])
    inputs = {s: ArtifactRef(**r) for s, r in spec["inputs"].items()}
    PARENT_RUN.set(spec["parent_run"])
    if spec["flow_run"]:
        os.environ.setdefault("PREFECT__FLOW_RUN_ID", spec["flow_run"])  # prefect.runtime's flow run id, for tags
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO, format=f"{RANK_PREFIX}{rank}] %(message)s", force=True)
    device = resolve_device(cfg.runner.device)  # cuda:LOCAL_RANK on GPUs
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 validates and writes the artifact after the last step while the others wait at the final barrier:
    # a generous timeout, so a long validation does not fail the run.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    try:
        work = Work(cfg, cfg.store.open(), trainer.stage, stage_key(cfg, trainer.stage, inputs), inputs, None)
        trainer(work, device, rank, world).run()
        dist.barrier()  # leave together: a rank that tears down its process group early can abort the others
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

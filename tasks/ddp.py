"""torchrun entry point: one DDP rank of a training stage.

`python -m torch.distributed.run ... -m tasks.ddp <stage.json>` (launched by `tasks.training.train_stage`; the
file holds the stage, the run config, its inputs' artifacts and the pipeline's MLflow run).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from dalle_core.config import config_from_dict
from dalle_core.device import resolve_device
from tasks.artifacts import ArtifactRef, Work, open_store, stage_key
from tasks.runs import PARENT_RUN
from tasks.training import train_rank, trainer_of


def main(spec_path: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s")
    with open(spec_path) as f:
        spec = json.load(f)
    cfg, stage = config_from_dict(spec["config"]), spec["stage"]
    inputs = {s: ArtifactRef(**r) for s, r in spec["inputs"].items()}
    PARENT_RUN.set(spec["parent_run"])
    if spec["flow_run"]:
        os.environ.setdefault("PREFECT__FLOW_RUN_ID", spec["flow_run"])  # prefect.runtime's flow run id, for tags
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.runner.device)  # cuda:LOCAL_RANK on GPUs
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    # Rank 0 validates and writes the artifact after the last step while the others wait at the final barrier:
    # a generous timeout, so a long validation does not fail the run.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    try:
        work = Work(cfg, open_store(cfg), stage, stage_key(cfg, stage, inputs), inputs, None)
        train_rank(work, trainer_of(stage), rank, world, device)
        dist.barrier()  # leave together: a rank that tears down its process group early can abort the others
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

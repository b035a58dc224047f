"""torchrun entry point: one DDP rank of a training stage.

`python -m torch.distributed.run ... -m tasks.ddp <dvae|transformer|clip> <config.json> <parent run> <flow run>`
(launched by `tasks.common.run_training_stage`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from dalle_core.config import config_from_dict
from dalle_core.device import resolve_device

STAGE_MODULES = {"dvae": "tasks.dvae", "transformer": "tasks.transformer", "clip": "tasks.clip"}


def main(stage: str, cfg_path: str, parent_run_id: str, flow_run_id: str) -> None:
    with open(cfg_path) as f:
        cfg = config_from_dict(json.load(f))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.runner.device)  # cuda:LOCAL_RANK on GPUs
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    # Rank 0 validates and writes the artifact after the last step while the others wait at the final barrier:
    # a generous timeout, so a long validation does not fail the run.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    try:
        run_training = importlib.import_module(STAGE_MODULES[stage]).run_training
        run_training(cfg, parent_run_id or None, flow_run_id or None, rank, world, device)
        dist.barrier()  # leave together: a rank that tears down its process group early can abort the others
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

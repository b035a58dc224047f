"""torchrun entry point: one DDP rank of transformer training (`python -m torch.distributed.run ... -m tasks.transformer_ddp`)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from dalle_core.config import config_from_dict
from tasks.transformer import run_training


def main(cfg_path: str, parent_run_id: str, flow_run_id: str) -> None:
    with open(cfg_path) as f:
        cfg = config_from_dict(json.load(f))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    try:
        run_training(cfg, parent_run_id or None, flow_run_id or None, rank, world, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

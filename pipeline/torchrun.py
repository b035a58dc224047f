"""Launching a training stage's DDP ranks through torchrun: `launch_ranks` starts them (`python -m
torch.distributed.run ... -m pipeline.ddp <stage.json>`, the file holding the stage's trainer class, the run config,
its inputs' artifacts and the pipeline's MLflow run) and reports their failure in one line. The rank itself is pipeline/ddp.py.

One machine: `torchrun --standalone`. Several (`train.nnodes` > 1): the same command runs on every machine and
they meet at `runner.rdzv_endpoint` (c10d rendezvous). NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from dalle_core.errors import UserError
from pipeline.config import Config
from pipeline.logs import log
from pipeline.runs import PARENT_RUN, _flow_run_id
from storage.store import StoreError
from storage.tracking import TrackingError

# The last line of a Python traceback: `package.module.SomeError: message`.
ERROR_LINE = re.compile(r"^((?:\w+\.)*\w*(?:Error|Exception)): (.*)$")
PACKAGES = ("dalle_core", "data_sources", "pipeline", "storage", "tasks")  # whose errors a rank may raise
RANK_PREFIX = "[rank "  # the ranks' own log lines (main's format); torch prefixes a rank's traceback `[rank1]: `


def torchrun_args(cfg: Config, stage: str) -> list[str]:
    """torchrun's launch arguments for a stage: standalone on one machine, c10d rendezvous across several."""
    train_cfg, runner = getattr(cfg, stage).train, cfg.runner
    if train_cfg.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={train_cfg.nproc}"]
    return [f"--nnodes={train_cfg.nnodes}", f"--nproc-per-node={train_cfg.nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={runner.rdzv_endpoint}", f"--rdzv-id={runner.rdzv_id}-{stage}"]


def launch_ranks(cfg: Config, trainer: type, inputs: dict) -> None:
    """Run a `StageTrainer`'s ranks through torchrun (the class is named in the file they read). Their log lines
    go to this process's log; everything they print goes to a file, whose path a failure names: a rank's own error is raised again as its class when it is one
    of this project's (`TrainingError: training diverged ...`, one line), else RuntimeError naming it."""
    stage = trainer.stage
    train_cfg = getattr(cfg, stage).train
    fd, output = tempfile.mkstemp(prefix=f"dalle-ddp-{stage}-", suffix=".log")
    with tempfile.TemporaryDirectory() as tmp, os.fdopen(fd, "w") as out:
        spec = os.path.join(tmp, "stage.json")
        with open(spec, "w") as f:
            json.dump({"trainer": f"{trainer.__module__}:{trainer.__qualname__}", "config": cfg.model_dump(mode="json"),
                       "inputs": {s: r.__dict__ for s, r in inputs.items()}, "parent_run": PARENT_RUN.get(),
                       "flow_run": _flow_run_id()}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, stage), "-m", "pipeline.ddp", spec]
        log.info("launching DDP: %s", " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PREFECT_LOGGING_EXTRA_LOGGERS": ""}  # a rank has no flow run to send its lines to
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first_error = None
        for line in proc.stdout:
            out.write(line)
            if line.startswith(RANK_PREFIX):
                log.info("%s", line.rstrip())
            elif first_error is None and (m := ERROR_LINE.match(re.sub(r"^\[rank\d+\]: ", "", line).strip())):
                first_error = m.groups()
        code = proc.wait()
    if code == 0:
        os.remove(output)
        return
    where = f" (every rank's output: {output})"
    if first_error:
        name, message = first_error
        module, _, cls = name.rpartition(".")
        if module.split(".")[0] in PACKAGES:
            error = getattr(importlib.import_module(module), cls, None)
            if isinstance(error, type) and issubclass(error, (UserError, StoreError, TrackingError)):
                raise error(message + where)
        raise RuntimeError(f"a DDP rank failed: {name}: {message}{where}")
    raise RuntimeError(f"torchrun with {train_cfg.nproc} process(es) per machine exited with code {code}{where}")

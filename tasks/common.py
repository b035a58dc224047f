"""What every stage task shares: the store, the stage keys, MLflow runs, progress logs,
input streams, checkpoints, and running a training stage (in-process or as DDP under torchrun)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.runtime import flow_run

from dalle_core import pretrained
from dalle_core.config import Config, TrainSection, flatten
from dalle_core.data import source_fingerprint
from dalle_core.device import prefetch_to_device
from dalle_core.evaluation import METRICS_VERSION
from dalle_core.loader import Decode, ShardStream
from dalle_core.train import FitResult, StepFn, fit, make_optimizer
from storage.parquet import ParquetShards
from storage.store import ArtifactStore, stage_key
from storage.tracking import StageRun, producer_run, tracking_uri


def open_store(cfg: Config) -> ArtifactStore:
    return ArtifactStore(cfg.store.root, cfg.store.storage_options)


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a local file's sha256 (read in chunks; remembered while size and mtime stay)."""
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def pretrained_source(cfg: Config) -> dict:
    """`dvae.pretrained`'s kind and files, each with its path and sha256 digest (for the key and manifest)."""
    kind, files = pretrained.source_files(cfg.dvae.pretrained, cfg.dvae.pretrained_config)
    return {"kind": kind, "files": {role: {"path": str(p), "sha256": file_digest(p)} for role, p in files.items()}}


def trained_section(cfg: Config, stage: str, **dump) -> dict:
    """A training stage's section as its key sees it: `init_from` as its source's content digest (moving the
    source keeps the key, changing a weight does not), and the fine-tuning keys left out while unset, so that
    the keys made before they existed stay what they were."""
    section = getattr(cfg, stage).model_dump(mode="json", **dump)
    if section["init_from"] is None:
        del section["init_from"]
    else:
        from tasks.model_source import source_digest

        section["init_from"] = source_digest(section["init_from"], stage, open_store(cfg))
    if not section["train"]["freeze"]:
        del section["train"]["freeze"]
    return section


EDIT_KEYS = ("edit_mode", "edit_image", "edit_region", "edit_mask", "edit_keep")  # generate.*: editing an image


def stage_keys(cfg: Config) -> dict[str, str]:
    """The content-addressed key of every stage, from its config section and its inputs' keys."""
    k: dict[str, str] = {}
    fingerprint = source_fingerprint(cfg.data)  # changed data is a new artifact; shapes need none
    data = cfg.data.model_dump(mode="json")
    if not data["shapes"]["colours"]:  # all colours: the key of the runs made before the option existed
        del data["shapes"]["colours"]
    k["images"] = stage_key({**data, **({"source_fingerprint": fingerprint} if fingerprint else {})})
    dvae = trained_section(cfg, "dvae", exclude={"encode_precision"})  # how tokens are made, not the model
    if cfg.dvae.pretrained:  # a loaded tokenizer is its files' content and the input normalisation, not paths
        src = pretrained_source(cfg)
        dvae = {"pretrained": {"kind": src["kind"], **{runner: f["sha256"] for runner, f in src["files"].items()}},
                "norm_mean": dvae["norm_mean"], "norm_std": dvae["norm_std"]}
    text = cfg.text.model_dump(mode="json")
    if cfg.tokenizers_from:  # an exported model's tokenizers: their content, not their path, and no input
        from tasks.model_source import source_digest

        k["dvae"] = stage_key({"tokenizers_from": source_digest(cfg.tokenizers_from, "dvae", None)})
        k["bpe"] = stage_key({"tokenizers_from": source_digest(cfg.tokenizers_from, "tokenizer", None),
                              "text_len": cfg.text.text_len})
    else:
        k["dvae"] = stage_key(dvae, {"images": k["images"]})
        if cfg.text.tokenizer_path:  # a given tokenizer is identified by its content, not its path
            text["tokenizer_path"] = file_digest(cfg.text.tokenizer_path) if os.path.exists(cfg.text.tokenizer_path) else cfg.text.tokenizer_path
            k["bpe"] = stage_key(text)
        else:
            k["bpe"] = stage_key(text, {"images": k["images"]})
    encode = {} if cfg.dvae.encode_precision == "fp32" else {"encode_precision": cfg.dvae.encode_precision}
    k["tokens"] = stage_key(encode, {"images": k["images"], "dvae": k["dvae"], "bpe": k["bpe"]})
    k["transformer"] = stage_key(trained_section(cfg, "transformer"), {"tokens": k["tokens"]})
    k["clip"] = stage_key(trained_section(cfg, "clip"), {"images": k["images"], "bpe": k["bpe"]})
    gen = cfg.generate.model_dump(mode="json")
    if gen["prime_image"] and os.path.exists(gen["prime_image"]):  # a prime image is identified by its content
        gen["prime_image"] = file_digest(gen["prime_image"])
    elif gen["prime_image"] is None:  # keys of runs without priming stay what they were
        del gen["prime_image"], gen["prime_rows"]
    for name in ("edit_image", "edit_mask"):  # an edit's source and mask images are identified by their content
        if gen[name] and os.path.exists(gen[name]):
            gen[name] = file_digest(gen[name])
    if gen["edit_mode"] is None:  # keys of runs without editing stay what they were
        for name in EDIT_KEYS:
            del gen[name]
    k["generations"] = stage_key(gen,
                                 {"transformer": k["transformer"], "dvae": k["dvae"], "clip": k["clip"], "bpe": k["bpe"],
                                  "images": k["images"]})
    sampling = cfg.generate.model_dump(mode="json", exclude={"prompts", "num_val_prompts", "best_k", "batch_size",
                                                             "prime_image", "prime_rows", *EDIT_KEYS})
    k["evaluation"] = stage_key({**cfg.evaluate.model_dump(mode="json"), "sampling": sampling,
                                 "metrics_version": METRICS_VERSION},
                                {s: k[s] for s in ("images", "dvae", "bpe", "transformer", "clip")})
    return k


@dataclass
class ArtifactRef:
    """What a stage task returns: where its output is, and whether it was reused."""

    stage: str
    key: str
    cached: bool
    uri: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}{' (cached)' if self.cached else ''}"


def ref(store: ArtifactStore, stage: str, key: str, cached: bool) -> ArtifactRef:
    return ArtifactRef(stage, key, cached, store.uri(store.path(stage, key)))


def logger():
    """The Prefect run logger inside a flow/task; a plain logger elsewhere (torchrun workers)."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        import logging

        log = logging.getLogger("dalle")
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        return log


def reuse(store: ArtifactStore, stage: str, key: str, cfg: Config | None = None,
          parent_run_id: str | None = None, claim: bool = True) -> ArtifactRef | None:
    """A reference to the finished artifact if there is one: a finished stage is never redone.

    Otherwise None, and this process holds the key's claim (`ArtifactStore.begin`): a second run of the
    same key waits here for the first and then reuses its artifact. The stage's `store.finish` ends the
    claim; on failure `store.release` (or the process's exit) does. A damaged artifact (unreadable manifest,
    a file of the wrong size) is moved aside and redone. `claim=False`: look only (the machines of one
    multi-node training job all run this task and meet in torchrun's rendezvous instead).

    Inside a pipeline run (`parent_run_id`), the reuse is recorded as a short child run tagged
    `cached=true`, linked to the run that made the artifact (`source_run_id`), so the MLflow run
    table shows which stages ran and which were reused."""
    log = logger()
    if store.begin(stage, key, log.info, claim=claim) is None:
        return None
    log.info("%s/%s is complete; reusing it", stage, key)
    if cfg is not None and parent_run_id:
        uri = tracking_uri(cfg.tracking.uri, store)
        source = producer_run(uri, cfg.tracking.experiment, stage, key)
        run = StageRun(uri, cfg.tracking.experiment, store, f"(cached) {stage}-{key}", stage=stage, key=key,
                       parent_run_id=parent_run_id, flow_run_id=flow_run.get_id(), source=cfg.tracking.source,
                       tags={"cached": "true", "source_run_id": source or "not in this tracking store",
                             "mlflow.note.content": f"Reused the finished artifact `{stage}/{key}` "
                             + (f"made by run {source}." if source else "(its run is not in this tracking store).")})
        run.end()
    return ref(store, stage, key, cached=True)


@contextlib.contextmanager
def claimed(store: ArtifactStore, stage: str, key: str) -> Iterator[None]:
    """The work of a stage whose key `reuse` claimed: an error ends the claim, so another run may redo it."""
    try:
        yield
    except BaseException:
        store.release(stage, key)
        raise


def no_retry_on_user_error(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry storage hiccups, not errors a retry cannot fix (a damaged file)."""
    from dalle_core.config import ConfigError
    from storage.store import StoreError

    return not isinstance(state.result(raise_on_failure=False), (StoreError, ConfigError))


def stage_run(cfg: Config, store: ArtifactStore, stage: str, key: str, params: dict,
              parent_run_id: str | None = None, flow_run_id: str | None = None) -> StageRun:
    """Start the MLflow run of one stage execution, tagged with its key, the Prefect flow run and the code
    version, with the run's resolved config as `config.yaml`."""
    run = StageRun(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment, store, f"{stage}-{key}",
                   stage=stage, key=key, parent_run_id=parent_run_id, flow_run_id=flow_run_id or flow_run.get_id(),
                   source=cfg.tracking.source, tags={"cached": "false"})
    run.log_params(flatten(params))
    run.log_text(config_yaml(cfg), "config.yaml")
    logger().info("MLflow run %s (stage %s, key %s)", run.run_id, stage, key)
    return run


@dataclass
class StagePlan:
    """What a stage mapped over shards or parts (pre-tokenization, generation) still has to do, and the
    MLflow run it reports to: opened when the work starts, so its duration and status are the work's."""

    todo: list
    run_id: str | None = None
    cached: ArtifactRef | None = None  # the finished artifact, when there is nothing to do
    stage: str = ""  # the store stage and key this process claimed for the work
    key: str = ""

    def abandon(self, cfg: Config) -> None:
        """The work failed: end the claim, so another run may redo the stage."""
        if self.key:
            open_store(cfg).release(self.stage, self.key)


def attach_run(cfg: Config, store: ArtifactStore, run_id: str) -> StageRun:
    """A stage run opened by an earlier task; as a context manager it ends FINISHED, or FAILED on an error."""
    return StageRun.attach(tracking_uri(cfg.tracking.uri, store), run_id)


def config_yaml(cfg: Config) -> str:
    """The resolved config (file + --set overrides) as YAML: what the run really used."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class Progress:
    """Progress lines with rate and ETA in the Prefect logs, at most every `every_s` seconds.

    `max_minutes`: a wall-clock cap (training budgets); the ETA is the sooner of the two.
    """

    def __init__(self, what: str, total: int | None, unit: str = "it", every_s: float = 5.0,
                 max_minutes: float | None = None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.max_s = max_minutes * 60 if max_minutes else float("inf")
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.logger = logger()

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = max(0.0, min(eta, self.max_s - (now - self.start)))
            self.logger.info("%s: %d/%d (%.0f%%) %.1f %s/s ETA %s %s", self.what, self.done, self.total,
                             100 * self.done / self.total, rate, self.unit, _fmt_s(eta), extra)
        else:
            self.logger.info("%s: %d %.1f %s/s %s", self.what, self.done, rate, self.unit, extra)


def _fmt_s(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


# ------------------------------------------------------------ checkpoints

def state_bytes(model) -> bytes:
    """Model weights as safetensors bytes (tied tensors are stored once each)."""
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})


def load_state_file(store: ArtifactStore, path: str, model) -> None:
    """Load safetensors weights from the store into `model`; a truncated or mismatched file is a StoreError
    naming it, its stage and how to redo it."""
    from safetensors.torch import load

    data = store.read_bytes(path)
    with store.reading(path):
        model.load_state_dict(load(data))


def save_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer, step: int,
                    extra: dict | None = None) -> None:
    """Write `checkpoints/step-N/` and then point `checkpoints/latest.json` at it; drop older ones."""
    from dalle_core.train import training_state_bytes

    name = f"step-{step:08d}"
    store.write_bytes(store.path(stage, key, "checkpoints", name, "model.safetensors"), state_bytes(model))
    store.write_bytes(store.path(stage, key, "checkpoints", name, "training_state.pt"),
                      training_state_bytes(optimizer))
    store.write_json(store.path(stage, key, "checkpoints", "latest.json"), {"step": step, "dir": name, **(extra or {})})
    for old in store.listdir(store.path(stage, key, "checkpoints")):
        if old.startswith("step-") and old != name:
            store.fs.rm(store.path(stage, key, "checkpoints", old), recursive=True)
    logger().info("checkpoint %s/%s at step %d", stage, key, step)


def load_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer) -> tuple[int, dict]:
    """Restore weights, optimizer and RNG from the latest checkpoint; returns (step, extra) or (0, {})."""
    from dalle_core.train import load_training_state

    latest = store.path(stage, key, "checkpoints", "latest.json")
    if not store.exists(latest):
        return 0, {}
    info = store.read_json(latest)
    base = store.path(stage, key, "checkpoints", info["dir"])
    load_state_file(store, f"{base}/model.safetensors", model)
    state = store.read_bytes(f"{base}/training_state.pt")
    with store.reading(f"{base}/training_state.pt"):
        load_training_state(optimizer, state)
    logger().info("resuming %s/%s from its checkpoint at step %d", stage, key, info["step"])
    return int(info["step"]), info


def drop_checkpoints(store: ArtifactStore, stage: str, key: str) -> None:
    path = store.path(stage, key, "checkpoints")
    if store.exists(path):
        store.fs.rm(path, recursive=True)


# ------------------------------------------------------------ input streams

def batch_stream(cfg: Config, store: ArtifactStore, paths: list[str], columns: list[str], decode: Decode,
                 batch_size: int, device, *, shuffle: bool = True, seed: int = 0, window_rows: int = 4096,
                 rank: int = 0, world: int = 1, start_batch: int = 0) -> Iterator[dict]:
    """Batches from Parquet shards on `device`: decoded in `runner.loader_workers` processes, pinned
    and copied ahead on GPUs; training streams (shuffle) are endless and start at `start_batch`."""
    stream = ShardStream(ParquetShards(store), paths, columns, decode, batch_size, shuffle=shuffle, seed=seed,
                         window_rows=window_rows, rank=rank, world=world, start_batch=start_batch)
    return prefetch_to_device(stream.batches(cfg.runner.loader_workers, pin_memory=device.type == "cuda"), device)


# ------------------------------------------------------------ training stages

@dataclass
class Training:
    """One rank's side of a training stage: the model (and its DDP wrapper), optimizer, where it resumes."""

    store: ArtifactStore
    stage: str
    key: str
    model: object
    wrapped: object
    optimizer: object
    train_cfg: TrainSection
    device: object
    rank: int
    world: int
    start: int
    elapsed_s: float

    @classmethod
    def prepare(cls, store: ArtifactStore, stage: str, key: str, model, train_cfg: TrainSection,
                device, rank: int = 0, world: int = 1) -> Training:
        """Model to the device, optimizer, resume from the latest checkpoint, DDP wrapper when world > 1."""
        model = model.to(device)
        optimizer = make_optimizer(model, train_cfg)
        start, info = load_checkpoint(store, stage, key, model, optimizer)
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        return cls(store, stage, key, model, wrapped, optimizer, train_cfg, device, rank, world, start,
                   float(info.get("elapsed_s", 0.0)))

    def fit(self, batches, step_fn: StepFn, run: StageRun | None, describe: Callable[[dict], str] = lambda m: "",
            validate: Callable[[], dict] | None = None, every: tuple = (), **kwargs) -> FitResult:
        """Run the training loop; rank 0 logs to MLflow and the Prefect log and writes checkpoints.

        `validate()` -> val metrics, logged every `train.val_every` steps, so they are curves in MLflow."""
        log = checkpoint = None
        if validate is not None and run is not None and self.train_cfg.val_every:
            every = (*every, (self.train_cfg.val_every, lambda step: run.log_metrics(validate(), step)))
        if self.rank == 0:
            assert run is not None
            progress = Progress(f"train-{self.stage}", self.train_cfg.max_steps - self.start, "steps",
                                max_minutes=self.train_cfg.max_minutes)

            def log(step: int, metrics: dict) -> None:
                run.log_metrics(metrics, step)
                progress.update(step - self.start - progress.done, f"loss {metrics['loss']:.4f} {describe(metrics)}",
                                force=True)

            def checkpoint(step: int, elapsed_s: float) -> None:
                save_checkpoint(self.store, self.stage, self.key, self.model, self.optimizer, step,
                                {"elapsed_s": elapsed_s})

        result = fit(self.wrapped, batches, self.train_cfg, self.optimizer, step_fn, start_step=self.start,
                     elapsed_s=self.elapsed_s, device=self.device, log=log, checkpoint=checkpoint,
                     world_size=self.world, every=every, **kwargs)
        if run is not None:
            run.set_tags({"stopped_by": result.stopped_by, "steps_done": str(result.step),
                          "steps_planned": str(self.train_cfg.max_steps), "resumed_from_step": str(self.start),
                          "device": str(self.device), "world_size": str(self.world)})
        return result


def train_stage_task(cfg: Config, stage: str, needs: tuple[str, ...], run_training: Callable,
                     parent_run_id: str | None) -> ArtifactRef:
    """A training stage's task: reuse a finished artifact, else train in this process, or launch `train.nproc`
    DDP processes per machine through torchrun.

    One machine: `torchrun --standalone`. Several (`train.nnodes` > 1): the same command runs on
    every machine and they meet at `runner.rdzv_endpoint` (c10d rendezvous). NCCL on GPUs, gloo on CPUs.
    """
    store, keys = open_store(cfg), stage_keys(cfg)
    key = keys[stage]
    if done := reuse(store, stage, key, cfg, parent_run_id, claim=getattr(cfg, stage).train.nnodes == 1):
        return done
    try:
        _train(cfg, store, stage, key, keys, needs, run_training, parent_run_id)
    finally:  # finish ended the claim if rank 0 ran here; a DDP run's rank 0 finished in another process
        store.release(stage, key)
    store.require(stage, key)
    return ref(store, stage, key, cached=False)


def _train(cfg: Config, store: ArtifactStore, stage: str, key: str, keys: dict, needs: tuple[str, ...],
           run_training: Callable, parent_run_id: str | None) -> None:
    for need in needs:
        store.require(need, keys[need])
    store.prepare(stage, key)
    train_cfg = getattr(cfg, stage).train
    if train_cfg.nproc == 1 and train_cfg.nnodes == 1:
        run_training(cfg, parent_run_id, flow_run.get_id())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = os.path.join(tmp, "config.json")
            with open(cfg_path, "w") as f:
                json.dump(cfg.model_dump(mode="json"), f)
            cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, stage),
                   "-m", "tasks.ddp", stage, cfg_path, parent_run_id or "", flow_run.get_id() or ""]
            logger().info("launching DDP: %s", " ".join(cmd))
            code = subprocess.call(cmd, env={**os.environ,
                                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if code != 0:
            raise RuntimeError(f"torchrun with {train_cfg.nproc} process(es) per machine exited with code {code}; "
                               "see the log above")


def torchrun_args(cfg: Config, stage: str) -> list[str]:
    """torchrun's launch arguments for a stage: standalone on one machine, c10d rendezvous across several."""
    train_cfg, runner = getattr(cfg, stage).train, cfg.runner
    if train_cfg.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={train_cfg.nproc}"]
    return [f"--nnodes={train_cfg.nnodes}", f"--nproc-per-node={train_cfg.nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={runner.rdzv_endpoint}", f"--rdzv-id={runner.rdzv_id}-{stage}"]

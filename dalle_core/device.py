"""Devices and precision: which device a run uses, bf16 autocast, and moving batches there.

One device setting (`runner.device`: auto | cpu | cuda | cuda:N) serves every stage;
under DDP each rank takes the GPU of its local rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from dalle_core import cpu_fast
from dalle_core.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> a torch.device; one-line error for a GPU that is not there.

    Under torchrun (LOCAL_RANK set) `cuda` and `auto` mean this rank's own GPU.
    """
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"runner.device is {spec!r} but this machine has no CUDA device "
                          f"(torch {torch.__version__}); use auto or cpu")
    if spec in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    else:
        index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"runner.device asks for cuda:{index} but only {torch.cuda.device_count()} "
                          f"CUDA device(s) exist (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def autocast(precision: str, device: torch.device | str = "cpu",
             seq_len: int | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass (fp32 weights and optimizer), or nothing for fp32.

    On CPU it also picks SDPA's kernel for the longest sequence the model attends over, `seq_len` (None = short):
    dalle_core.cpu_fast.bf16_attention_kernel. On GPU the default (flash / memory-efficient) kernels are kept.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=kind, dtype=torch.bfloat16))
    if kind == "cpu":
        stack.enter_context(cpu_fast.bf16_attention_kernel(seq_len))
    return stack


def sampling_precision(precision: str, device: torch.device) -> str:
    """`generate.precision` auto -> the one measured faster on each device (docs/benchmarks.md): bf16 on CPU,
    fp32 on CUDA, where a step is launch-bound. `dalle_core.sampling.for_sampling` says what bf16 means on each
    device."""
    if precision == "auto":
        return "fp32" if device.type == "cuda" else "bf16"
    return precision


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (in dicts, tuples, lists) to `device`; pinned host tensors copy asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def prefetch_to_device(batches: Iterator, device: torch.device) -> Iterator:
    """Yield batches already on `device`, the next one's host-to-device copy issued before this one is used."""
    if device.type == "cpu":
        yield from batches
        return
    ahead = None
    for batch in batches:
        moved = to_device(batch, device)
        if ahead is not None:
            yield ahead
        ahead = moved
    if ahead is not None:
        yield ahead


def rng_state() -> dict[str, Any]:
    """The torch RNG state of this process: CPU, and every CUDA device when CUDA is in use."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])

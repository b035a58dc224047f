"""DDP arithmetic: one step on two gloo ranks equals one single-process step on the union batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from dalle_core.train import FitState, TrainConfig, fit
from dalle_core.transformer import DALLE, DALLEConfig, transformer_step

C = DALLEConfig(text_vocab=40, text_len=5, pad_id=0, image_vocab=16, image_grid=3, dim=32, depth=2, heads=4)
T = TrainConfig(batch_size=4, lr=0.5, warmup_steps=0, max_steps=1, grad_clip=1.0, weight_decay=0.1)


def _union_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"text": torch.randint(1, C.text_vocab, (8, C.text_len), generator=g),
            "image": torch.randint(0, C.image_vocab, (8, C.image_len), generator=g)}


def _one_step(batch: dict, world: int = 1, rank: int = 0, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = DALLE(C).to(device)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device != "cpu" else None)
    # SGD: the step is the (clipped) gradient itself. Adam's first step, lr * sign(g), would turn
    # float noise in near-zero gradients into full-size differences.
    fit(wrapped, iter(lambda: batch, None), T, torch.optim.SGD(model.parameters(), lr=T.lr),
        transformer_step(0.0, C.pad_id, 0), state=FitState(device=device, world_size=world))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, port: int, out: str, backend: str) -> None:
    import torch.distributed as dist

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    union = _union_batch()
    mine = {k: v[rank * 4:(rank + 1) * 4] for k, v in union.items()}  # disjoint halves
    torch.save(_one_step(mine, 2, rank, device), f"{out}.{rank}")
    dist.destroy_process_group()


TWO_GPUS = pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL DDP needs 2+ CUDA devices; this machine has "
                                          f"{torch.cuda.device_count()}")])


@pytest.mark.parametrize("backend", ["gloo", TWO_GPUS])
def test_two_ranks_equal_one_process_on_the_union_batch(tmp_path, backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path / "weights"), backend), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"weights.{r}") for r in (0, 1))
    single = _one_step(_union_batch())
    torch.manual_seed(0)
    before = DALLE(C).state_dict()
    moved = 0
    for k in single:
        assert torch.equal(r0[k], r1[k]), k  # the ranks stay in lockstep
        assert torch.allclose(r0[k], single[k], atol=1e-6, rtol=1e-5), k  # and took the union batch's step
        moved += not torch.equal(single[k], before[k])
    assert moved > len(single) // 2  # the step really changed the weights

import pytest

from dalle_core import train
from dalle_core.train import Budget, TrainConfig, lr_at


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(train.time, "monotonic", c)
    return c


def test_step_budget_keeps_the_step_schedule():
    t = TrainConfig(lr=1e-3, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    b = Budget(t)
    steps = [s for s in range(200) if not b.check(s)]
    assert steps == list(range(100)) and b.horizon == 100
    assert lr_at(9, t) == pytest.approx(1e-3) and lr_at(100, t) == pytest.approx(1e-4)


def test_clock_budget_decays_the_lr_by_the_deadline(clock):
    # 1000 steps asked for, but at 0.1 s per step one minute holds only 600
    t = TrainConfig(lr=1e-3, max_steps=1000, max_minutes=1, warmup_steps=10, min_lr_ratio=0.1)
    b = Budget(t)
    step, lrs = 0, []
    while not b.check(step):
        lrs.append(lr_at(step, t, b.horizon))
        clock.now += 0.1
        step += 1
    assert 598 <= step <= 602
    assert 595 <= b.horizon <= 602
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)  # ended cooled down, not mid-schedule
    assert lr_at(step - 1, t) > 3e-4  # what the step-based schedule would have left


def _rank_loop(rank: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    clock = Clock()
    train.time.monotonic = clock
    t = TrainConfig(lr=1e-3, max_steps=1000, max_minutes=1, warmup_steps=10)
    b, step, trace = Budget(t), 0, []
    while not b.check(step):
        trace.append((step, b.horizon))
        clock.now += 0.1 * (rank + 1)  # rank 1 runs at half the speed of rank 0
        step += 1
    with open(f"{out}.{rank}", "w") as f:
        json.dump(trace, f)
    dist.destroy_process_group()


def test_ranks_agree_on_the_horizon_and_the_last_step(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_loop, args=(port, str(tmp_path / "trace")), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"trace.{r}").read_text()) for r in (0, 1))
    assert r0 == r1  # same steps, same horizons on both ranks
    assert 295 <= len(r0) <= 305  # the slower rank's clock decides


def test_a_resumed_run_keeps_its_wall_clock_budget(clock):
    """max_minutes counts the whole run: resumed after 30 s of a 1-minute budget, it gets 30 s more, so it
    stops where an uninterrupted run stops and its LR horizon does not move."""
    t = TrainConfig(lr=1e-3, max_steps=1000, max_minutes=1, warmup_steps=10)

    def run(start: int, elapsed_s: float, until_s: float | None = None) -> tuple[int, int, float]:
        b, step, t0 = Budget(t, start, elapsed_s), start, clock.now
        while not b.check(step) and (until_s is None or clock.now - t0 < until_s):
            clock.now += 0.1
            step += 1
        return step, b.horizon, b.elapsed()

    whole_step, whole_horizon, _ = run(0, 0.0)
    killed_at, _, elapsed = run(0, 0.0, until_s=30)
    resumed_step, resumed_horizon, total = run(killed_at, elapsed)
    assert 295 <= killed_at <= 305 and abs(resumed_step - whole_step) <= 2
    assert abs(resumed_horizon - whole_horizon) <= 3 and total == pytest.approx(60, abs=0.3)

"""How far a training stage got: the one line and the numbers every training stage reports at its end."""

import pytest

from dalle_core.train import FitResult, TrainConfig
from pipeline.training import how_far


def test_a_falling_loss_cut_short_by_the_clock():
    train = TrainConfig(batch_size=8, max_steps=400, max_minutes=2.0)
    losses = [(s, 3.0 - 0.01 * s) for s in range(0, 101, 10)]  # still falling steeply at the end
    far = how_far(FitResult(100, "max_minutes", 120.0), train, losses, rows=200)
    assert far.budget_share == 0.25 and far.epochs == 4.0 and far.still_falling
    assert far.line("transformer") == (
        "ran 100 of 400 steps (25%), cut short by the clock: raise transformer.train.max_minutes (now 2) or remove "
        f"it to run every step; 4.0 epochs; loss still falling over the last tenth ({far.loss_change_last_tenth:+.1%})")
    assert far.metrics() == {"budget_share": 0.25, "epochs": 4.0, "loss_change_last_tenth": far.loss_change_last_tenth}


def test_a_flat_loss_that_ran_its_budget_and_unknown_sizes():
    train = TrainConfig(batch_size=4, grad_accum=2, max_steps=50)
    far = how_far(FitResult(50, "max_steps", 9.0), train, [(s, 1.0 + 0.001 * (s % 2)) for s in range(0, 51, 5)], 100,
                  world=2)
    assert far.epochs == 50 * 4 * 2 * 2 / 100 and not far.still_falling
    assert far.line("clip").startswith("ran 50 of 50 steps (100%); 8.0 epochs; loss flat over the last tenth")
    sparse = how_far(FitResult(30, "max_steps", 1.0), train, [(10, 2.0), (20, 1.5), (30, 1.0)], 100)
    assert sparse.loss_change_last_tenth == pytest.approx(-0.05 * 3 / 1.25)  # the last two: -0.05 a step, a tenth 3
    bare = how_far(FitResult(50, "max_steps", 9.0), train, [(50, 1.0)], None)
    assert bare.line("dvae") == "ran 50 of 50 steps (100%)" and bare.metrics() == {"budget_share": 1.0}

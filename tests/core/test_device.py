"""The device setting and what travels with a checkpoint."""

import pytest
import torch

from dalle_core.device import resolve_device
from dalle_core.errors import ConfigError
from dalle_core.train import TrainConfig, load_training_state, make_optimizer, training_state_bytes
from tests.conftest import DEVICES


def test_device_setting_resolves_or_fails_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError) as err:
        resolve_device(f"cuda:{n}")  # one past the last GPU (or any GPU on a CPU machine)
    assert "\n" not in str(err.value) and "runner.device" in str(err.value)


@pytest.mark.parametrize("device", DEVICES)
def test_training_state_restores_the_rng_of_the_device(device):
    model = torch.nn.Linear(4, 4).to(device)
    opt = make_optimizer(model, TrainConfig())
    torch.manual_seed(1)
    torch.rand(3, device=device)  # make sure the device's generator is in use
    state = training_state_bytes(opt)
    expected = torch.rand(5, device=device)
    torch.rand(7, device=device)  # move on, as a killed run would have
    load_training_state(opt, state)
    assert torch.equal(torch.rand(5, device=device), expected)

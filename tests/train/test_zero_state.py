"""What goes into the full optimizer state a ZeRO checkpoint carries, checked without a process group.

DeepSpeed's ``safe_get_full_optimizer_state`` assembles a parameter's state from every rank's partition; on
one rank the full state is the torch optimizer's own, which the stand-in below returns. Re-partitioning it
on another world size is covered by the multi-process resume test (``tests/dist_scripts/zero_resume.py``).
"""

from types import SimpleNamespace

import deepspeed.utils
import pytest
import torch
from torch import nn

from ilm_dist.train.zero_state import gather_full_optimizer_state, restore_full_optimizer_state


class NoEngine:
    """An engine whose optimizer must not be touched."""

    def __init__(self, stage: int):
        self.stage = stage

    def zero_optimization_stage(self) -> int:
        return self.stage

    def __getattr__(self, name):
        pytest.fail(f"the engine's {name} was used")


def one_rank_zero_engine(optimizer_cls, **kwargs):
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module[0].bias.requires_grad_(False)  # frozen: it has no optimizer state
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, lr=0.1, **kwargs)
    engine = SimpleNamespace(
        module=module,
        optimizer=SimpleNamespace(optimizer=optimizer),
        zero_optimization_stage=lambda: 1,
    )
    return engine, module, optimizer


def step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    module(torch.randn(8, 3, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    optimizer.step()


@pytest.fixture
def one_rank(monkeypatch):
    """DeepSpeed's full-state getter on one rank: the optimizer's own state of the parameter."""
    optimizers = []

    def full_state(param, key):
        return optimizers[0].state[param][key].clone()

    monkeypatch.setattr(deepspeed.utils, "safe_get_full_optimizer_state", full_state)
    return optimizers


def test_without_zero_nothing_is_gathered_and_nothing_restored():
    assert gather_full_optimizer_state(NoEngine(stage=0)) is None
    restore_full_optimizer_state(NoEngine(stage=1), {})  # saved before the first step: nothing to do


def test_before_the_first_step_the_state_is_empty(one_rank):
    engine, _, optimizer = one_rank_zero_engine(torch.optim.SGD, momentum=0.9)
    one_rank.append(optimizer)
    assert gather_full_optimizer_state(engine) == {}


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs", "per_element", "scalars"),
    [
        (torch.optim.SGD, {"momentum": 0.9}, {"momentum_buffer"}, set()),  # MoCo's optimizer
        (torch.optim.Adam, {}, {"exp_avg", "exp_avg_sq"}, {"step"}),
    ],
)
def test_every_trainable_parameter_s_state_is_gathered(one_rank, optimizer_cls, kwargs, per_element, scalars):
    engine, module, optimizer = one_rank_zero_engine(optimizer_cls, **kwargs)
    one_rank.append(optimizer)
    step(module, optimizer)
    saved = gather_full_optimizer_state(engine)
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert set(saved["params"]) == set(trainable) and "0.bias" not in saved["params"]
    assert set(saved["scalars"]) == scalars
    for name, p in trainable.items():
        assert set(saved["params"][name]) == per_element
        for key in per_element:
            assert torch.equal(saved["params"][name][key], optimizer.state[p][key])
            assert saved["params"][name][key].device.type == "cpu"
    if scalars:
        assert float(saved["scalars"]["step"]) == 1.0

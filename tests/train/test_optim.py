"""ilm_dist.train.optim: the linear scaling rule, the optimizer (its one parameter group, weight decay on
every trainable parameter, a first step against the update written out by hand) and the warm-up + cosine
schedule against its closed form."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ilm_dist.config import OptimConfig
from ilm_dist.train.optim import build_optimizer, build_scheduler, lr_factor, scaled_lr


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].weight.requires_grad = False  # frozen: not optimized
    return model


@pytest.mark.parametrize(
    ("lr", "scale", "batch", "expected"),
    [(0.03, True, 256, 0.03), (0.03, True, 64, 0.0075), (1.2, True, 512, 2.4), (0.03, False, 64, 0.03)],
)
def test_linear_scaling_rule(lr, scale, batch, expected):
    assert scaled_lr(OptimConfig(lr=lr, scale_lr=scale), batch) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_one_group_of_the_trainable_parameters_with_weight_decay_on_all(name):
    model = small_model()
    cfg = OptimConfig(name=name, momentum=0.8, weight_decay=0.05)
    opt = build_optimizer(model, cfg, lr=0.5)
    assert isinstance(opt, torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
    (group,) = opt.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert model[2].weight not in set(group["params"]) and len(trainable) == 5  # BN weight/bias included
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.05
    if name == "sgd":
        assert group["momentum"] == 0.8


def first_step(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(parameters before, their gradients, after) of one step of ``name`` with lr 0.1, wd 0.01."""
    model = small_model()
    opt = build_optimizer(model, OptimConfig(name=name, momentum=0.9, weight_decay=0.01), lr=0.1)
    params = opt.param_groups[0]["params"]
    before = [p.detach().clone().double() for p in params]
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    grads = [p.grad.detach().clone().double() for p in params]
    opt.step()
    return before, grads, [p.detach().double() for p in params]


def test_sgd_first_step_is_p_minus_lr_times_grad_plus_decay():
    for p, g, new in zip(*first_step("sgd"), strict=True):
        torch.testing.assert_close(new, p - 0.1 * (g + 0.01 * p), rtol=1e-6, atol=1e-7)


def test_adamw_first_step_is_decoupled_decay_plus_a_sign_step():
    # step 1: m/(1-b1) = g, v/(1-b2) = g^2, so the Adam step is lr * g / (|g| + eps)
    for p, g, new in zip(*first_step("adamw"), strict=True):
        expected = p * (1 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)


def closed_form(steps: np.ndarray, total: int, warmup: int, schedule: str) -> np.ndarray:
    cosine = 0.5 * (1 + np.cos(np.pi * np.clip((steps - warmup) / max(1, total - warmup), 0, 1)))
    after = np.ones_like(cosine) if schedule == "constant" else cosine
    return np.where(steps < warmup, (steps + 1) / max(warmup, 1), after)


@pytest.mark.parametrize(
    ("warmup", "total", "schedule"),
    [(0, 20, "cosine"), (4, 14, "cosine"), (5, 5, "cosine"), (3, 10, "constant")],
)
def test_lr_factor_is_warmup_then_cosine_closed_form(warmup, total, schedule):
    cfg = OptimConfig(warmup_steps=warmup, schedule=schedule)
    steps = np.arange(total + 4)  # past the end: stays at the cosine's floor
    got = np.array([lr_factor(int(s), total, cfg) for s in steps])
    np.testing.assert_allclose(got, closed_form(steps, total, warmup, schedule), rtol=0, atol=1e-12)


def test_chosen_points_of_the_schedule():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, 14, cfg) for s in (0, 3, 4, 9, 14, 99)] == pytest.approx(
        [0.25, 1.0, 1.0, 0.5, 0.0, 0.0]
    )
    assert lr_factor(6, 14, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))


def test_the_scheduler_sets_base_lr_times_the_factor_after_each_step():
    cfg = OptimConfig(warmup_steps=3, lr=0.2)
    model = small_model()
    opt = build_optimizer(model, cfg, lr=0.2)
    sched = build_scheduler(opt, cfg, total_steps=12)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(
        seen, 0.2 * closed_form(np.arange(15), 12, 3, "cosine"), rtol=1e-12, atol=1e-15
    )

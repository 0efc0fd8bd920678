"""The supervised training loop shared by fine-tuning (images) and probing (cached features).

Adam with lr 1e-3 and model selection by the validation metric, as in the official fine-tuning
and probing code (Kaku et al. 2021: ``torch.optim.Adam(lr=1e-3)``, best-validation checkpoint).

Data parallel (fine-tuning under the ``deepspeed`` launcher): the model is wrapped in PyTorch's
``DistributedDataParallel``, each rank's loader yields its share of the global batch, and DDP averages
the gradients, so the update is the single-process update on the global batch. DDP rather than a
DeepSpeed engine: this is a plain fp32 Adam loop on a ResNet classifier that needs no ZeRO, mixed
precision or engine checkpoints, and model selection copies a plain ``state_dict``. The process group
itself is DeepSpeed's, started as in pretraining.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ilm_dist.data.shard_format import squeeze_labels
from ilm_dist.distributed import all_reduce_mean_, world_size
from ilm_dist.eval.metrics import check_metric, compute_metrics, probabilities
from ilm_dist.eval.settings import FitSettings


@dataclass
class FitResult:
    steps: int
    best_step: int
    best_val: float
    history: list[dict] = field(default_factory=list)


def task_loss(task: str, logits: Tensor, labels: Tensor) -> Tensor:
    """BCE-with-logits per finding (multilabel), cross-entropy over classes otherwise."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels.long().reshape(-1))


def eval_points(steps: int, evals: int) -> set[int]:
    """``evals`` validation steps spread evenly over ``1..steps``, always including the last."""
    return {max(1, round(steps * i / evals)) for i in range(1, evals + 1)} | {steps}


def validation_steps(steps: int, steps_per_epoch: int, evals: int, each_epoch: bool) -> set[int]:
    """The end of every epoch (``each_epoch``, as PyTorch Lightning validates), or :func:`eval_points`;
    the last step always."""
    if each_epoch:
        return set(range(steps_per_epoch, steps + 1, steps_per_epoch)) | {steps}
    return eval_points(steps, evals)


def schedule(settings: FitSettings, steps_per_epoch: int) -> tuple[int, set[int]]:
    """The optimizer steps of a fit (``epochs`` passes, at least ``min_steps``) and its validation steps."""
    steps = max(settings.epochs * steps_per_epoch, settings.min_steps)
    return steps, validation_steps(steps, steps_per_epoch, settings.evals, settings.eval_each_epoch)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (tiny linear layers: thread wake-ups cost more than the math)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of ``model`` in eval mode over ``loader``."""
    model.eval()
    logits, labels = [], []
    for inputs, target in loader:
        logits.append(model(inputs.to(device)).float().cpu().numpy())
        labels.append(target.numpy())
    return np.concatenate(logits), squeeze_labels(np.concatenate(labels))


def metric_score(metric: str, task: str, logits: np.ndarray, labels: np.ndarray, class_names: tuple) -> float:
    """Metric ``metric`` (one of :func:`ilm_dist.eval.metrics.task_metrics`) of ``logits`` against ``labels``."""
    return compute_metrics(task, labels, probabilities(task, logits), class_names)[metric]


def val_score(
    model: nn.Module, loader: DataLoader, device: torch.device, metric: str, task: str, class_names: tuple
) -> float:
    """Metric ``metric`` on a validation loader."""
    return metric_score(metric, task, *predict(model, loader, device), class_names)


def _average_buffers(module: nn.Module) -> None:
    """Average the floating buffers (BatchNorm running statistics) over ranks.

    Each rank's BatchNorm sees its own part of the global batch; with equal parts the mean of the
    ranks' running means is the single-process running mean, the mean of running variances leaves out
    the spread of the rank means. Every rank then evaluates (and keeps) the same network.
    """
    for buffer in module.buffers():
        if buffer.is_floating_point():
            all_reduce_mean_(buffer.data)


def _ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP without buffer syncing in forward (buffers are averaged before validation instead)."""
    params = inspect.signature(DistributedDataParallel).parameters  # newer torch renamed the flag
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


def fit(
    model: nn.Module,
    trainable: nn.Module,
    loader: DataLoader,
    task: str,
    settings: FitSettings,
    evaluate: Callable[[str], float],
    device: torch.device,
    data_parallel: bool = False,
) -> FitResult:
    """Train ``trainable`` (``model`` or a part of it) with ``settings.lr`` for the steps of
    :func:`schedule`, validating after its validation steps (``evaluate(metric)``: the validation score
    of ``settings.select``); keep the weights (and buffers) of the best validation score.

    Only ``trainable`` is put in train mode, so a frozen backbone stays in eval mode (fixed BN statistics).
    ``data_parallel`` (with a process group of several ranks): ``loader`` yields this rank's share of
    each global batch, gradients are averaged over ranks (DDP), ``trainable``'s buffers are averaged
    before each validation, the recorded train loss is the mean over ranks, and ``evaluate`` must
    return the same score on every rank (so all ranks keep the same weights).
    """
    steps, checks = schedule(settings, len(loader))
    select = check_metric(settings.select, task, "--select")
    distributed = data_parallel and world_size() > 1
    net = _ddp(model, device) if distributed else model
    optimizer = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad], lr=settings.lr)
    result = FitResult(steps, steps, float("nan"))
    best_state, losses, batches = None, [], _forever(loader)
    for step in range(1, steps + 1):
        trainable.train()
        inputs, labels = next(batches)
        loss = task_loss(task, net(inputs.to(device)), labels.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"step {step}: non-finite training loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in checks:
            train_loss = torch.tensor(np.mean(losses), dtype=torch.float64, device=device)
            if distributed:
                _average_buffers(trainable)
                all_reduce_mean_(train_loss)
            score = evaluate(select)
            result.history.append({"step": step, "train_loss": train_loss.item(), "val": score})
            losses = []
            if math.isfinite(score) and (best_state is None or score > result.best_val):
                result.best_step, result.best_val = step, score
                best_state = copy.deepcopy(trainable.state_dict())
    if best_state is not None:
        trainable.load_state_dict(best_state)
    return result

"""Losses between the query and key encoders' intermediate block outputs (Kaku et al. 2021): their common
shape and their registry.

Each loss compares the query encoder's block ``i`` output for view 1 with the key (momentum) encoder's
block ``i`` output for view 2; no gradient flows into the key encoder. A loss is a subclass of
:class:`IntermediateLoss` that owns its options (a dataclass ``Config``, read from ``loss.<name>`` of the
run config) and registers itself with :func:`register_intermediate_loss`; ``loss.type: <name>`` then
selects it, and the config, the sweeps' plots and the benchmark list it. The built-in ones are
:mod:`ilm_dist.losses.mse` and :mod:`ilm_dist.losses.barlow_twins`; a loss in a module outside the package
registers when the run config names that module in ``loss.plugins`` (:func:`import_loss_modules`).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ilm_dist.errors import ConfigError


class LossConfig(Protocol):
    """What a loss reads of the run config's ``loss`` section (:class:`ilm_dist.config.LossConfig`)."""

    type: str
    blocks: list[int]
    weights: list[float]
    options: dict[str, Any]  # one section per registered loss, by name


NO_LOSS = "none"  # loss.type without an intermediate loss (MoCo v2 alone)
INTERMEDIATE_LOSSES: dict[str, type[IntermediateLoss]] = {}


class IntermediateLoss(nn.Module):
    """Base: ``reduce`` shrinks block outputs (also applied to keys before any gather); ``forward`` scores them.

    Subclasses set ``name`` (the ``loss.type`` value and the prefix of the logged terms) and ``Config``
    (a dataclass of the loss's own options, at ``loss.<name>`` in the run config; it may define
    ``check(self) -> None`` raising :class:`~ilm_dist.errors.ConfigError`).
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg: LossConfig, channels: list[int]):
        super().__init__()
        self.blocks = list(cfg.blocks)
        self.options = cfg.options[self.name]
        # fp32 whatever the training precision (in fp16, 5e-5 / 32 would be subnormal)
        self.register_buffer("weights", torch.tensor(cfg.weights, dtype=torch.float32), persistent=False)

    def term_names(self) -> list[str]:
        return [f"{self.name}_block{b}" for b in self.blocks]

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        """Weighted per-block losses ``[len(blocks)]``; their sum is added to InfoNCE."""
        raise NotImplementedError

    def comm_bytes(self, batch: int, world: int, itemsize: int) -> float:
        """Bytes a rank sends per training step in the loss's own collectives, for ``batch`` samples per rank
        on ``world`` ranks in ``itemsize``-byte activations (the dry run's estimate); none by default."""
        return 0.0


def register_intermediate_loss(cls: type[IntermediateLoss]) -> type[IntermediateLoss]:
    """Class decorator: makes ``cls.name`` a ``loss.type`` with options ``cls.Config`` at ``loss.<name>``."""
    if cls.name == NO_LOSS or cls.name in INTERMEDIATE_LOSSES:
        raise ValueError(f"intermediate loss {cls.name!r} is already registered")
    INTERMEDIATE_LOSSES[cls.name] = cls
    return cls


def import_loss_modules(modules: list[str], key: str) -> None:
    """Import ``modules`` (what ``loss.plugins`` names) so that the losses they define register; a
    :class:`ConfigError` naming ``key`` when one is not on the Python path or registers no loss."""
    for name in modules:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"{key}: {name!r} is not a module name (dotted, e.g. my_losses or my_pkg.losses)"
            )
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not f"{name}.".startswith(f"{err.name}."):
                raise  # the module itself imports something missing: its traceback says where
            raise ConfigError(
                f"{key}: no module {name!r} on the Python path (install it, or add its folder to PYTHONPATH)"
            ) from None
        if not any(_registered_here(value, name) for value in vars(module).values()):
            raise ConfigError(
                f"{key}: module {name!r} registers no intermediate loss "
                "(define a subclass of IntermediateLoss decorated with @register_intermediate_loss)"
            )


def _registered_here(value: Any, module: str) -> bool:
    """Whether ``value`` is a loss class defined in ``module`` and registered under its name."""
    return (
        isinstance(value, type)
        and issubclass(value, IntermediateLoss)
        and value.__module__ == module
        and INTERMEDIATE_LOSSES.get(getattr(value, "name", None)) is value
    )


def loss_types() -> list[str]:
    """Every ``loss.type`` value: ``none`` and the registered losses, in registration order."""
    return [NO_LOSS, *INTERMEDIATE_LOSSES]


def build_intermediate_loss(cfg: LossConfig, channels: list[int]) -> IntermediateLoss | None:
    """The loss ``cfg.type`` names (None for ``none``), for an encoder with block ``channels``."""
    return None if cfg.type == NO_LOSS else INTERMEDIATE_LOSSES[cfg.type](cfg, channels)

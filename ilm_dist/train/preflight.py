"""Checks of a pretraining run that need no process group: run with every rank's start, and by the sweep."""

from __future__ import annotations

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.errors import ConfigError


def preflight(config_path: str, overrides: list[str]) -> tuple[RunConfig, Manifest | None]:
    """Load and validate the config and its data before any process group exists; returns the config and
    the packed set's manifest (None for the synthetic backend), to be handed to the trainer."""
    cfg = load_config(config_path, overrides)
    if cfg.data.backend == "synthetic":
        return cfg, None
    manifest = load_manifest(cfg.data.shards)
    manifest.split(cfg.data.split)
    if cfg.val.every:
        _check_val_split(cfg, manifest.split(cfg.val.split).num_samples)
    return cfg, manifest


def _check_val_split(cfg: RunConfig, num_samples: int) -> None:
    """The validation loss needs at least one whole batch of ``data.batch_size``."""
    drawn = min(num_samples, cfg.val.max_samples or num_samples)
    if drawn < cfg.data.batch_size:
        raise ConfigError(
            f"val.split: split {cfg.val.split!r} of {cfg.data.shards} gives {drawn} samples to validate on "
            f"(val.max_samples={cfg.val.max_samples}), fewer than one batch of data.batch_size={cfg.data.batch_size}"
        )

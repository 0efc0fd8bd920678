"""Checks of a pretraining run that need no process group: run with every rank's start, and by the sweep."""

from __future__ import annotations

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data.manifest import load_manifest


def preflight(config_path: str, overrides: list[str]) -> RunConfig:
    """Load and validate the config and its data before any process group exists."""
    cfg = load_config(config_path, overrides)
    if cfg.data.backend != "synthetic":
        load_manifest(cfg.data.shards).split(cfg.data.split)
    return cfg

"""Command-line entry points; ``launch/*.py`` are thin wrappers around these."""

from __future__ import annotations

import argparse
import logging
import sys

from ilm_dist.config import ConfigError, load_config
from ilm_dist.data.manifest import ManifestError, load_manifest


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MoCo v2 + intermediate-layer pretraining")
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20")
    return parser


def preflight(config_path: str, overrides: list[str]):
    """Load and validate the config and its data before any process group exists."""
    cfg = load_config(config_path, overrides)
    if cfg.data.backend != "synthetic":
        load_manifest(cfg.data.shards).split(cfg.data.split)
    return cfg


def pretrain_main(argv: list[str] | None = None) -> None:
    args = pretrain_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = preflight(args.config, args.overrides)
    except (ConfigError, ManifestError) as err:
        sys.exit(f"error: {err}")
    from ilm_dist.train.trainer import Trainer

    Trainer(cfg, resume=args.resume).fit()

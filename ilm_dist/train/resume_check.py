"""What a resumed run must share with the run it continues: the data it trains on and the settings that define it.

A resume continues the saved step in the saved permutation of the saved data; on other data or another model,
loss or augmentation it would silently train a different run under the old one's name. So ``--resume``
compares the dataset (the packed set's ``manifest.json`` by sha256, which names every shard with its own
sha256; the synthetic set by its settings) and the run-defining settings with the run's, and refuses a
difference naming both values, unless ``--allow-changes`` asks for it, which the run then records in
``resume_changes.jsonl``. Length, checkpointing, logging, the engine, the batch and the number of ranks (which
a resume re-shards for) may change freely.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ilm_dist.config import DataConfig, RunConfig, to_plain
from ilm_dist.data.manifest import Manifest
from ilm_dist.errors import InputError
from ilm_dist.train.run_dir import RunDir

# The settings that make a run what it is (dotted paths into the saved config.yaml).
RUN_DEFINING = (
    "seed",
    "model",
    "moco",
    "loss",
    "aug",
    "optim",
    "data.backend",
    "data.split",
    "data.image_size",
)


def data_identity(data: DataConfig, manifest: Manifest | None) -> dict[str, Any]:
    """What identifies the data a run trains on: the manifest's sha256 (and where it was), or without one
    (``data.backend=synthetic``) the synthetic set's settings."""
    if manifest is None:
        return {"synthetic": to_plain(data.synthetic)}
    return {"shards": str(data.shards), "manifest_sha256": manifest.sha256}


def settings_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The run-defining settings that differ between the run's saved config and ``cfg``, as ``key: old -> new``
    per leaf key (``model.arch: 'resnet18' -> 'resnet34'``). A key the saved config lacks (a setting added
    since the run started, such as ``model.stem``) had its default value."""
    old_leaves, new_leaves, default_leaves = (
        {k: v for key in RUN_DEFINING for k, v in _leaves(key, _at(c, key))}
        for c in (saved, cfg.to_dict(), RunConfig().to_dict())
    )
    old_leaves = default_leaves | old_leaves
    return [
        f"{key}: {old_leaves.get(key)!r} -> {new_leaves.get(key)!r}"
        for key in dict.fromkeys([*old_leaves, *new_leaves])
        if old_leaves.get(key) != new_leaves.get(key)
    ]


def _leaves(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    return [(key, value)]


def data_change(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The dataset difference between a checkpoint's identity and this config's (none for an older checkpoint
    that saved none; the same manifest in another folder is the same data)."""
    if saved is None or _same_data(saved, now):
        return []
    return [f"data: {_describe(saved)} -> {_describe(now)}"]


def refuse_changes(run: RunDir, changes: list[str], allowed: bool) -> None:
    """Refuse ``changes`` naming them and the run's folder, unless ``allowed`` (``--allow-changes``)."""
    if changes and not allowed:
        raise InputError(
            f"--resume: this config changes what the run in {run.root} is ({'; '.join(changes)}); resume with the "
            "run's own settings and data, start a new run, or pass --allow-changes to continue it on purpose "
            f"(recorded in {run.resume_changes})"
        )


def record_changes(run: RunDir, changes: list[str], step: int) -> None:
    """Append the allowed ``changes`` of a resume at ``step`` to the run's ``resume_changes.jsonl``."""
    if changes:
        with run.resume_changes.open("a") as log:
            record = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}
            log.write(json.dumps(record) + "\n")


def _same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    key = "manifest_sha256" if "manifest_sha256" in a and "manifest_sha256" in b else "synthetic"
    return a.get(key) == b.get(key)


def _describe(identity: dict[str, Any]) -> str:
    if "synthetic" in identity:
        return f"synthetic {identity['synthetic']}"
    return f"{identity['shards']} (manifest sha256 {identity['manifest_sha256'][:12]})"


def _at(mapping: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        mapping = mapping.get(part) if isinstance(mapping, dict) else None
    return mapping

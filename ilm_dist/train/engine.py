"""The DeepSpeed engine: config resolution, precision, wrapping the trainable module, checkpoint I/O.

The process group it runs in is started by :func:`ilm_dist.distributed.init_process_group`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ilm_dist.config import ConfigError
from ilm_dist.serialization import load_tensors, save_tensors

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}  # fp32, no ZeRO


def resolve_deepspeed_config(path: str | None, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (``engine.deepspeed_config``; None: :data:`DEFAULT_DS_CONFIG`) with
    the per-rank batch ``micro_batch`` (``data.batch_size``) and ilm_dist's fixed settings."""
    try:
        ds = json.loads(Path(path).read_text()) if path else dict(DEFAULT_DS_CONFIG)
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.deepspeed_config: {path} is not valid JSON ({err})") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"engine.deepspeed_config: {path} sets {key!r}; ilm_dist sets it from the run config "
                "(data.batch_size, optim.*) — remove it from the JSON"
            )
    if ds.get("zero_optimization", {}).get("stage", 0) not in (0, 1, 2):
        raise ConfigError(f"engine.deepspeed_config: {path}: ZeRO stage must be 0, 1 or 2")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"engine.deepspeed_config: {path} enables both bf16 and fp16")
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["zero_allow_untested_optimizer"] = True  # our torch optimizer, deliberately
    ds.setdefault("steps_per_print", 10**9)
    return ds


def precision_of(ds_config: dict[str, Any]) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the dtype DeepSpeed keeps the module and wants inputs in."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return name
    return "fp32"


def wrap(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """Hand the trainable module to DeepSpeed; returns the engine, reading and writing its checkpoint
    files through :func:`safe_checkpoint_engine`."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    return engine


def safe_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine with safe I/O: loads with ``weights_only=True`` (DeepSpeed's own
    ``torch.load(weights_only=False)`` runs whatever a resumed file pickled) and saves through a Python file,
    so a full disk raises ``OSError`` naming the file (:mod:`ilm_dist.serialization`)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            save_tensors(state_dict, path)

        def load(self, path: str, map_location=None):
            return load_tensors(path, "DeepSpeed checkpoint file", deepspeed=True)

    return SafeTorchCheckpointEngine(config)

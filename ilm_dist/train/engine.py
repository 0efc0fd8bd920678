"""Everything DeepSpeed-specific lives here: process group, device, config resolution, wrapping.

On a machine without CUDA ``DS_ACCELERATOR=cpu`` selects DeepSpeed's CPU accelerator and gloo;
it must be set before deepspeed is imported, which :func:`select_accelerator` does.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from ilm_dist.config import ConfigError, RunConfig
from ilm_dist.distributed import DistInfo, barrier, dist_info
from ilm_dist.serialization import load_tensors, save_tensors

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before it is imported: ``cuda`` when usable, else ``cpu``."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shm_allreduce_segment(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU backend creates for ``rank`` (name as in its ``shm.cpp``)."""
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_allreduce_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce segment once every rank has mapped it.

    On the CPU accelerator DeepSpeed maps a ~66 MiB segment per rank (for ``inference_all_reduce``,
    which training never uses) and never unlinks it, so every run, finished or killed, left its
    segments in /dev/shm: RAM gone until reboot (sglang#38638 hit the same). After the barrier every
    rank has mapped its peers' segments, so unlinking only drops the name; the memory is freed when
    the last rank exits, however it exits.
    """
    barrier()
    shm_allreduce_segment(rank).unlink(missing_ok=True)


def init_distributed(cfg: RunConfig) -> tuple[DistInfo, torch.device]:
    """Join the launcher's process group (or make a world of one for plain ``python``)."""
    accelerator = select_accelerator()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = cfg.engine.dist_backend
    if backend == "auto":
        backend = "nccl" if accelerator == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.engine.collective_timeout_s)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    info = dist_info()
    if accelerator == "cpu":
        _unlink_shm_allreduce_segment(info.rank)
    if accelerator == "cuda":
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def resolve_deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The JSON named by ``engine.deepspeed_config`` plus the batch size from the run config."""
    path = cfg.deepspeed_config_path()
    try:
        ds = json.loads(Path(path).read_text())
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
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
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

"""Everything DeepSpeed-specific lives here: process group, device, config resolution, wrapping.

On a machine without CUDA ``DS_ACCELERATOR=cpu`` selects DeepSpeed's CPU accelerator and gloo;
it must be set before deepspeed is imported, which :func:`select_accelerator` does.

Mixed precision is DeepSpeed's ``torch_autocast`` mode: the module, and so the weights the optimizer
updates, the BatchNorm running statistics and every loss constant, stay fp32; the forward runs under
``torch.autocast`` (convolutions and matmuls in bf16/fp16). Under ZeRO 1/2 the module's fp32 weights are
all-gathered copies of the fp32 master partitions, bit for bit, so the key encoder's EMA and the exported
backbone read the master weights at no cost. DeepSpeed's ``bf16``/``fp16`` modes are refused: they cast
the module to 16 bits, so the EMA would average a rounded copy, and BatchNorm either keeps bf16 weights
with fp32 statistics (CPU ``batch_norm`` rejects the mix) or, with ``data_types.buffer_dtype``, keeps its
running statistics in 16 bits (with momentum 0.1 a bf16 statistic near 1 cannot move by less than ~4%).
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the 16-bit torch_autocast.dtype spellings DeepSpeed accepts (its DtypeEnum), by precision
AUTOCAST_NAMES = {
    **dict.fromkeys(("bf16", "bfloat16", "torch.bfloat16"), "bf16"),
    **dict.fromkeys(("fp16", "float16", "half", "torch.float16"), "fp16"),
}
AUTOCAST_SPELLING = {"bf16": "bfloat16", "fp16": "float16"}


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
    for mode in ("bf16", "fp16"):
        if ds.get(mode, {}).get("enabled"):
            raise ConfigError(
                f"engine.deepspeed_config: {path} enables DeepSpeed's {mode} mode, which casts the module to "
                f"16 bits (rounded master copy for the key encoder's EMA, 16-bit BatchNorm statistics); use "
                f'"torch_autocast": {{"enabled": true, "dtype": "{AUTOCAST_SPELLING[mode]}"}} instead, '
                f"as configs/deepspeed/{mode}_zero1.json does"
            )
    precision_of(ds, path)  # a bad autocast dtype fails here, naming the file
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["zero_allow_untested_optimizer"] = True  # our torch optimizer, deliberately
    ds.setdefault("steps_per_print", 10**9)
    return ds


def precision_of(ds_config: dict[str, Any], path: str | Path = "the DeepSpeed config") -> str:
    """``bf16``, ``fp16`` or ``fp32``: the compute dtype of the forward (``torch_autocast.dtype``).

    Weights, gradients, optimizer state and buffers are fp32 tensors whatever this returns.
    """
    autocast = ds_config.get("torch_autocast", {})
    if not autocast.get("enabled"):
        return "fp32"
    name = str(autocast.get("dtype")).lower()
    if name not in AUTOCAST_NAMES:
        raise ConfigError(
            f"engine.deepspeed_config: {path}: torch_autocast.dtype is {autocast.get('dtype')!r}; set one of "
            f"{sorted(AUTOCAST_NAMES)} (unset, torch picks float16 on CUDA and bfloat16 on CPU)"
        )
    return AUTOCAST_NAMES[name]


def wrap(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """Hand the trainable module to DeepSpeed; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine

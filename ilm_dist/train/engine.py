"""The DeepSpeed engine: config resolution, precision, wrapping the trainable module, checkpoint I/O.

The process group it runs in is started by :func:`ilm_dist.distributed.init_process_group`.

Mixed precision is DeepSpeed's ``torch_autocast`` mode: the module, and so the weights the optimizer
updates, the BatchNorm running statistics and every loss constant, stay fp32; the forward runs under
``torch.autocast`` (convolutions and matmuls in bf16/fp16). Under ZeRO 1/2 the module's fp32 weights are
all-gathered copies of the fp32 master partitions, bit for bit, so the key encoder's EMA and the exported
backbone read the master weights at no cost. DeepSpeed's ``bf16``/``fp16`` modes are refused: they cast
the module to 16 bits, so the EMA would average a rounded copy, and BatchNorm either keeps bf16 weights
with fp32 statistics (CPU ``batch_norm`` rejects the mix) or, with ``data_types.buffer_dtype``, keeps its
running statistics in 16 bits (with momentum 0.1 a bf16 statistic near 1 cannot move by less than ~4%).
ZeRO 1/2 reduce every gradient in fp32 (:data:`FP32_REDUCTION`), in buckets of
:data:`REDUCE_BUCKET_ELEMENTS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ilm_dist.config import ConfigError, EngineConfig
from ilm_dist.cpu_placement import cpu_has_amx
from ilm_dist.serialization import load_tensors, save_tensors
from ilm_dist.strict import load_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the 16-bit torch_autocast.dtype spellings DeepSpeed accepts (its DtypeEnum), by precision
AUTOCAST_NAMES = {
    **dict.fromkeys(("bf16", "bfloat16", "torch.bfloat16"), "bf16"),
    **dict.fromkeys(("fp16", "float16", "half", "torch.float16"), "fp16"),
}
AUTOCAST_SPELLING = {"bf16": "bfloat16", "fp16": "float16"}


DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}  # fp32, no ZeRO

# DeepSpeed tags the parameters of torch_autocast.lower_precision_safe_modules (default: Linear, Conv1d-3d)
# with comm_dtype = the autocast dtype (runtime/torch_autocast.py, init_autocast_params); ZeRO 1/2 give each
# comm dtype a bucket and cast its gradients to that dtype before reducing them, also on one rank
# (runtime/zero/stage_1_and_2.py: DeepSpeedZeroOptimizer.__init__'s ipg_buckets, allreduce_bucket and
# gradient_reduction_w_predivide). With no module listed every gradient is reduced in its parameter's dtype,
# fp32: twice the bytes, but the ranks' sum (and gradient accumulation's) is not rounded to 8 bits
# (tests/integration/test_precision.py, test_zero_reduces_autocast_gradients_in_fp32).
FP32_REDUCTION = {"lower_precision_safe_modules": []}

# ZeRO 1/2 allocate a buffer of reduce_bucket_size fp32 elements per bucket, two with overlap_comm, whatever
# the model's size (stage_1_and_2.py, setup_buckets): DeepSpeed's default, 5e8, is 2 GB per buffer. 25 MiB
# is DDP's bucket (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb=25): a 25 M-parameter model's
# gradient is 4 buckets. allgather_bucket_size allocates nothing (runtime/utils.py, all_gather_dp_groups
# gathers into the flat weights), so it keeps DeepSpeed's default.
REDUCE_BUCKET_ELEMENTS = 25 * 2**20 // 4


def resolve_deepspeed_config(path: str | None, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (``engine.deepspeed_config``; None: :data:`DEFAULT_DS_CONFIG`) with
    the per-rank batch ``micro_batch`` (``data.batch_size``) and ilm_dist's fixed settings."""
    try:
        ds = load_json(Path(path).read_text()) if path else dict(DEFAULT_DS_CONFIG)
    except ValueError as err:  # JSONDecodeError, DuplicateKeyError, or UnicodeDecodeError for a binary file
        raise ConfigError(f"engine.deepspeed_config: {path}: not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(
            f"engine.deepspeed_config: {path}: holds {type(ds).__name__}, expected a JSON object"
        )
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"engine.deepspeed_config: {path} sets {key!r}; ilm_dist sets it from the run config "
                "(data.batch_size, optim.*) — remove it from the JSON"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"engine.deepspeed_config: {path}: ZeRO stage must be 0, 1 or 2")
    for mode in ("bf16", "fp16"):
        if ds.get(mode, {}).get("enabled"):
            raise ConfigError(
                f"engine.deepspeed_config: {path} enables DeepSpeed's {mode} mode, which casts the module to "
                f"16 bits (rounded master copy for the key encoder's EMA, 16-bit BatchNorm statistics); use "
                f'"torch_autocast": {{"enabled": true, "dtype": "{AUTOCAST_SPELLING[mode]}"}} instead, '
                f"as configs/deepspeed/{mode}_zero1.json does"
            )
    precision = precision_of(ds, path)  # a bad autocast dtype fails here, naming the file
    _set_gradient_reduction(ds, path, precision, stage)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["zero_allow_untested_optimizer"] = True  # our torch optimizer, deliberately
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _set_gradient_reduction(ds: dict[str, Any], path: str | None, precision: str, stage: int) -> None:
    """ZeRO 1/2 reduce in fp32 (:data:`FP32_REDUCTION`), in buckets of :data:`REDUCE_BUCKET_ELEMENTS` unless
    the JSON sets ``zero_optimization.reduce_bucket_size``; settings that would reduce in 16 bits, or clip
    loss-scaled gradients, are refused."""
    autocast = ds.get("torch_autocast", {})
    if autocast.get("lower_precision_safe_modules"):
        raise ConfigError(
            f"engine.deepspeed_config: {path} sets torch_autocast.lower_precision_safe_modules, whose "
            "gradients ZeRO would reduce in 16 bits; remove the key (ilm_dist reduces every gradient in fp32)"
        )
    if precision == "fp16" and stage and ds.get("gradient_clipping", 0):
        # stage_1_and_2.py, unscale_and_clip_grads: the norm it clips is the GradScaler's scaled one, divided
        # by DeepSpeed's own loss scale (1 under torch_autocast)
        raise ConfigError(
            f"engine.deepspeed_config: {path}: gradient_clipping is {ds['gradient_clipping']} with fp16 "
            "autocast under ZeRO 1/2, which would clip the loss-scaled gradients; set it to 0 or use bf16"
        )
    if autocast.get("enabled"):
        ds["torch_autocast"] = {**autocast, **FP32_REDUCTION}
    if stage:
        ds["zero_optimization"].setdefault("reduce_bucket_size", REDUCE_BUCKET_ELEMENTS)


def with_cpu_autocast(
    ds_config: dict[str, Any], mode: str, device: torch.device
) -> tuple[dict[str, Any], str]:
    """``engine.cpu_autocast``: with ``auto``, a CPU rank whose CPU has AMX runs bf16 autocast where the
    DeepSpeed config sets none (on the project's AMX Xeon a step was 1.3x faster than fp32 at 64 px and 2.1x
    at 224 px, no faster at 32 px: bench/NOTES.md, section h). Returns the config and the reason, for the plan line."""
    if mode == "none" or device.type != "cpu" or ds_config.get("torch_autocast", {}).get("enabled"):
        return ds_config, ""
    if not cpu_has_amx():
        return ds_config, "engine.cpu_autocast=auto: fp32, this CPU has no AMX"
    autocast = {"torch_autocast": {"enabled": True, "dtype": AUTOCAST_SPELLING["bf16"], **FP32_REDUCTION}}
    return {**ds_config, **autocast}, "engine.cpu_autocast=auto: bf16 autocast, this CPU has AMX"


def forward_dtype(engine_cfg: EngineConfig, micro_batch: int, device: torch.device) -> torch.dtype:
    """The dtype a run's forward computes in on ``device``: its DeepSpeed config's autocast, else
    ``engine.cpu_autocast``'s choice (what the trainer runs, so that an evaluation can run the same)."""
    ds_config = resolve_deepspeed_config(engine_cfg.deepspeed_config, micro_batch)
    ds_config, _ = with_cpu_autocast(ds_config, engine_cfg.cpu_autocast, device)
    return DTYPES[precision_of(ds_config)]


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


def wrap(
    model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any], channels_last: bool = False
):
    """Hand the trainable module to DeepSpeed; returns the engine, reading and writing its checkpoint
    files through :func:`safe_checkpoint_engine`. ``channels_last`` (``model.channels_last``): under ZeRO
    stage 0 the module's weights turn channels-last once DeepSpeed has started (its start-up broadcast views
    every weight as bytes, ``p.data.view(torch.uint8)``, which a channels-last weight refuses), so that
    the convolutions of a channels-last step do not convert their weights every step (9% of a bf16 step at
    64 px on the project's CPU, bench/NOTES.md section h); ZeRO 1/2 keep them contiguous in their flat
    partitions."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # one rank: DeepSpeed would still flatten, all-reduce and copy back every gradient each step, which
        # changes nothing (same weights, bitwise) and costs 2-7% of a CPU step (bench/NOTES.md, section g)
        engine.enable_backward_allreduce = False
    if channels_last and engine.zero_optimization_stage() == 0:
        engine.module.to(memory_format=torch.channels_last)
    return engine


def step(engine) -> None:
    """``engine.step()``; after a step that fp16 autocast under ZeRO 1/2 skipped, the loss scale backs off.

    DeepSpeedZeroOptimizer.step (runtime/zero/stage_1_and_2.py) returns on an inf/NaN gradient before
    ``_optimizer_step``, the only caller of its GradScaler's ``update``: the scale never came down, and with
    a scale too high for the gradients every later step was skipped (on 2 CPU ranks at 32 px, all of them:
    tests/integration/test_precision.py, test_fp16_zero_loss_scale_backs_off_after_an_overflow). Here it backs off as
    ``update`` does after a skipped step (torch.amp.GradScaler: scale x backoff_factor, growth count 0)."""
    skipped = engine.skipped_steps
    engine.step()
    scaler = getattr(engine.optimizer, "torch_autocast_gradscaler", None)
    if scaler is not None and engine.skipped_steps > skipped:
        state = scaler.state_dict()
        scaler.load_state_dict(
            {**state, "scale": state["scale"] * state["backoff_factor"], "_growth_tracker": 0}
        )


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

"""Dry-run planning of a distributed job: shapes, data split, memory and communication per rank.

Nothing is allocated: the model is built on the ``meta`` device and one forward on a meta batch
measures the activations. Memory figures are estimates for one rank and say how they are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.sampling import GlobalBatch
from ilm_dist.errors import ArgumentParser, exit_on_input_error, fail
from ilm_dist.model.moco import MoCoILM
from ilm_dist.train.engine import DTYPES, precision_of, resolve_deepspeed_config
from ilm_dist.train.optim import scaled_lr
from ilm_dist.train.run_dir import RunDir
from ilm_dist.train.run_plan import training_plan

GIB = 1024**3


@dataclass
class Plan:
    lines: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))

    def render(self) -> str:
        width = max(len(k) for k, _ in self.lines)
        text = [f"{k:<{width}}  {v}" for k, v in self.lines]
        return "\n".join(text + [f"WARNING: {w}" for w in self.warnings])


def activation_bytes(model: MoCoILM, batch: int, image_size: int, bytes_per: int) -> int:
    """Sum of every leaf module's output size for one query forward: what autograd keeps, roughly."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * bytes_per

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if not list(m.children())]
    with torch.no_grad():
        model.encoder(torch.empty(batch, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    return total


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_plan(
    cfg: RunConfig, nodes: int, gpus_per_node: int, num_samples: int | None, num_shards: int | None
) -> Plan:
    plan, world = Plan(), nodes * gpus_per_node
    ds = resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
    precision, stage, accum = (
        precision_of(ds),
        ds.get("zero_optimization", {}).get("stage", 0),
        ds["gradient_accumulation_steps"],
    )
    batch = cfg.data.batch_size
    global_batch = GlobalBatch(batch, world, accum)
    plan.add("world", f"{nodes} nodes x {gpus_per_node} ranks = {world} ranks")
    plan.add("batch", f"{batch}/rank x {world} ranks x {accum} accumulation = global {global_batch.samples}")
    compute = f"{precision} autocast (fp32 weights, statistics, losses)" if precision != "fp32" else "fp32"
    plan.add("precision / ZeRO", f"{compute}, stage {stage}")
    lr = scaled_lr(cfg.optim, global_batch.samples)
    plan.add("learning rate", f"{lr:.4g} ({cfg.optim.name}, {cfg.optim.schedule})")
    _plan_queue(plan, cfg, global_batch.per_micro_step)
    _plan_data(plan, cfg, global_batch, num_samples, num_shards)
    with torch.device("meta"):
        model = MoCoILM(cfg.model, cfg.moco, cfg.loss)
    _plan_encoder(plan, cfg, model)
    _plan_memory(plan, cfg, model, ds, precision, stage, world)
    _plan_comm(plan, cfg, model, precision, world, batch)
    return plan


def block_shapes(model: MoCoILM, image_size: int) -> list[tuple[int, ...]]:
    """``(C, H, W)`` of blocks 1-4 for one ``image_size`` input (two samples: train-mode BatchNorm refuses
    one value per channel)."""
    with torch.no_grad():
        out = model.encoder(torch.empty(2, 3, image_size, image_size, device="meta"))
    return [tuple(block.shape[1:]) for block in out.blocks]


def _plan_encoder(plan: Plan, cfg: RunConfig, model: MoCoILM) -> None:
    shapes = block_shapes(model, cfg.data.image_size)
    plan.add(
        "encoder",
        f"{cfg.model.arch}, {cfg.model.stem} stem; blocks 1-4 at {cfg.data.image_size} px: "
        + ", ".join("x".join(map(str, shape)) for shape in shapes),
    )


def _plan_queue(plan: Plan, cfg: RunConfig, keys_per_step: int) -> None:
    k = cfg.moco.queue_size
    plan.add(
        "queue", f"{k} keys; {keys_per_step} enter per step -> a key lives {k / keys_per_step:.1f} steps"
    )
    if k < keys_per_step:
        plan.warnings.append(
            f"moco.queue_size={k} is smaller than one global batch of keys ({keys_per_step})"
        )


def _plan_data(
    plan: Plan, cfg: RunConfig, batch: GlobalBatch, samples: int | None, shards: int | None
) -> None:
    if samples is None:
        plan.add("data", "no manifest read (pass --num-samples or make data.shards reachable)")
        return
    steps = samples // batch.per_micro_step
    dropped = samples - steps * batch.per_micro_step
    plan.add(
        "data", f"{samples} samples -> {steps} steps/epoch, {dropped} dropped per epoch (same on every rank)"
    )
    line = training_plan(
        cfg.train, cfg.optim, cfg.val, RunDir(cfg.output_dir), batch, steps // batch.accumulation
    )
    plan.add("run", line.removeprefix("plan: "))
    if steps == 0:
        plan.warnings.append("fewer samples than one global batch: the job cannot take a step")
    if shards is not None:
        plan.add(
            "shards", f"{shards} shards, {shards / batch.ranks:.2f} per rank (readers split by sample index)"
        )


# the modules whose weights torch.autocast casts to 16 bits for the forward (its lower-precision ops)
AUTOCAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def autocast_params(model: nn.Module) -> int:
    """Parameters of the modules autocast computes in 16 bits, from 16-bit copies of their weights."""
    return sum(count(m) for m in model.modules() if isinstance(m, AUTOCAST_MODULES))


def reduce_buffer_bytes(ds: dict, stage: int) -> int:
    """ZeRO 1/2's gradient reduction buffers: ``reduce_bucket_size`` fp32 elements, two with overlap_comm,
    none without contiguous_gradients (deepspeed/runtime/zero/stage_1_and_2.py, setup_buckets)."""
    zero = ds.get("zero_optimization", {})
    if not stage or not zero.get("contiguous_gradients", True):
        return 0
    return zero["reduce_bucket_size"] * 4 * (2 if zero.get("overlap_comm") else 1)


def _plan_memory(
    plan: Plan, cfg: RunConfig, model: MoCoILM, ds: dict, precision: str, stage: int, world: int
) -> None:
    """The engine's module stays fp32 (torch_autocast): it is the master under ZeRO 0, and ZeRO 1/2 add
    an fp32 partition; autocast holds 16-bit copies of the conv/linear weights through forward + backward.

    (DeepSpeed's ``estimate_zero2_model_states_mem_needs`` does not apply: it assumes 16-bit module weights
    and Adam's two fp32 states, where this engine keeps the module fp32 and MoCo's SGD keeps one.)"""
    params, low = count(model), DTYPES[precision].itemsize
    weights = params * 4
    casts = autocast_params(model) * low if precision != "fp32" else 0
    master = params * 4 / world if stage >= 1 else 0
    optim_state = params * 4 * (2 if cfg.optim.name == "adamw" else 1) / (world if stage >= 1 else 1)
    grads = params * 4 / (world if stage >= 2 else 1)
    buckets = reduce_buffer_bytes(ds, stage)
    key_encoder = count(model.encoder) * 4  # fp32 EMA copy
    queue = cfg.moco.queue_size * cfg.moco.dim * 4
    acts = activation_bytes(model, cfg.data.batch_size, cfg.data.image_size, low)
    total = weights + casts + master + optim_state + grads + buckets + key_encoder + queue + acts
    plan.add(
        "parameters", f"{params / 1e6:.1f} M trainable (+ {count(model.encoder) / 1e6:.1f} M key encoder)"
    )
    plan.add(
        "memory / rank",
        f"~{total / GIB:.1f} GiB = fp32 weights {weights / GIB:.2f} + {precision} casts {casts / GIB:.2f} + "
        f"ZeRO master {master / GIB:.2f} + optimizer {optim_state / GIB:.2f} + fp32 grads {grads / GIB:.2f} + "
        f"ZeRO reduce buffers {buckets / GIB:.2f} + "
        f"key encoder {key_encoder / GIB:.2f} + queue {queue / GIB:.3f} + activations {acts / GIB:.2f} "
        "(sum of leaf-module outputs of one query forward)",
    )


def _plan_comm(plan: Plan, cfg: RunConfig, model: MoCoILM, precision: str, world: int, batch: int) -> None:
    """Bytes each rank sends per step: ring all-reduce 2(R-1)/R, all-gather (R-1)/R, all_to_all (R-1)/R."""
    if world == 1:
        plan.add("communication", "none (one rank)")
        return
    low, ring = DTYPES[precision].itemsize, (world - 1) / world
    # all-reduce, or reduce-scatter + all-gather under ZeRO 1/2; every gradient in fp32 (engine.FP32_REDUCTION)
    grads = 2 * ring * count(model) * 4
    keys = ring * world * batch * cfg.moco.dim * 4
    shuffle = 0.0
    if cfg.moco.shuffle_bn:  # all_to_all: images out, key features (embedding + reduced blocks) back
        with torch.no_grad():  # two samples: train-mode BatchNorm refuses one value per channel
            two = model.key_features(
                model.encoder, torch.empty(2, 3, cfg.data.image_size, cfg.data.image_size, device="meta")
            )
        per_sample = 3 * cfg.data.image_size**2 * low + sum(t.numel() for t in two) // 2 * 4
        shuffle = ring * batch * per_sample  # on average (R-1)/R of a rank's B samples leave it
    loss = model.intermediate.comm_bytes(batch, world, low) if model.intermediate is not None else 0.0
    total = grads + keys + shuffle + loss
    plan.add(
        "communication / step",
        f"~{total / 1e6:.1f} MB/rank = gradients {grads / 1e6:.1f} + keys {keys / 1e6:.2f} + shuffle-BN "
        f"{shuffle / 1e6:.1f} + {cfg.loss.type} loss {loss / 1e6:.2f}",
    )


def dry_run_main(argv: list[str] | None = None) -> None:
    """Validate a configuration for a cluster shape and print the plan, without a cluster."""
    parser = ArgumentParser(description="plan a distributed pretraining job without running it")
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--num-samples", type=int, default=None, help="split size when the shards are not reachable"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    with exit_on_input_error():
        cfg = load_config(args.config, args.overrides)
        samples, shards = args.num_samples, None
        if cfg.data.backend != "synthetic" and samples is None:
            split = load_manifest(cfg.data.shards).split(cfg.data.split)
            samples, shards = split.num_samples, len(split.shards)
    if args.nodes < 1 or args.gpus_per_node < 1:
        fail("--nodes and --gpus-per-node must be >= 1")
    print(build_plan(cfg, args.nodes, args.gpus_per_node, samples, shards).render())


if __name__ == "__main__":
    dry_run_main()

"""Mixed precision keeps fp32 where it matters: masters, EMA, BatchNorm statistics, losses, export.

The 16-bit engine configs use DeepSpeed's ``torch_autocast`` (fp32 module, autocast forward). The
launcher runs below check, on CPU ranks, that the exported backbone and the key encoder's EMA use the
fp32 master weights as DeepSpeed itself reconstructs them from the ZeRO partitions
(``deepspeed.utils.zero_to_fp32``), that a bf16 run's BatchNorm running statistics track an fp32 run's,
that a ZeRO-1 run resumes, also on another world size, that ZeRO 1/2 reduce the gradients in fp32 in
buffers of 25 MiB, and that the fp16 loss scale backs off after an overflow
(tests/dist_scripts/zero_precision.py).
"""

import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from ilm_dist.config import ConfigError, load_config
from ilm_dist.distributed import select_accelerator
from ilm_dist.losses.contrastive import info_nce, moco_logits
from ilm_dist.model.moco import MoCoILM
from ilm_dist.ops.reference import bt_xcorr_loss_reference
from ilm_dist.train.engine import (
    REDUCE_BUCKET_ELEMENTS,
    precision_of,
    resolve_deepspeed_config,
    with_cpu_autocast,
)
from tests.launcher import REPO, read_metrics, run_deepspeed

BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits

TINY = [
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=4",
    "data.synthetic.num_samples=512",
    "moco.queue_size=48",
    "moco.momentum=0",  # the key encoder becomes a copy of the query weights it reads at each step
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.lr=1e-6",  # the weights barely move: the statistics of both precisions see the same network
    "train.log_every=1",
    "train.ckpt_every=1",
    "train.keep_checkpoints=2",
]


def pretrain(out: Path, ds_config: str, steps: int, *extra: str, num_procs: int = 2):
    args = ["--config", "configs/demo.yaml", f"output_dir={out}", *TINY, f"train.max_steps={steps}"]
    args += [f"engine.deepspeed_config=configs/deepspeed/{ds_config}.json", *extra]
    return run_deepspeed("launch/pretrain.py", args, num_procs=num_procs)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("name", "precision", "stage"),
    [("fp32", "fp32", 0), ("bf16_zero1", "bf16", 1), ("bf16_zero2", "bf16", 2), ("fp16_zero1", "fp16", 1)],
)
def test_shipped_engine_configs_keep_the_module_fp32(name, precision, stage):
    cfg = load_config(
        REPO / "configs/demo.yaml", [f"engine.deepspeed_config={REPO}/configs/deepspeed/{name}.json"]
    )
    ds = resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
    assert precision_of(ds) == precision
    assert ds["zero_optimization"]["stage"] == stage
    assert not ds.get("bf16", {}).get("enabled") and not ds.get("fp16", {}).get("enabled")
    assert "buffer_dtype" not in ds.get("data_types", {})
    # ZeRO 1/2 reduce every gradient in fp32 (no module DeepSpeed would tag with a 16-bit comm dtype) in
    # 25 MiB buckets; the all-gather allocates no buffer and keeps DeepSpeed's default
    if precision != "fp32":
        assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
    assert ds["zero_optimization"].get("reduce_bucket_size") == (REDUCE_BUCKET_ELEMENTS if stage else None)
    assert REDUCE_BUCKET_ELEMENTS * 4 == 25 * 2**20
    assert "allgather_bucket_size" not in ds["zero_optimization"]


def test_bf16_autocast_chosen_for_an_amx_cpu_reduces_in_fp32(monkeypatch):
    monkeypatch.setattr("ilm_dist.train.engine.cpu_has_amx", lambda: True)
    cfg = load_config(
        REPO / "configs/demo.yaml", [f"engine.deepspeed_config={REPO}/configs/deepspeed/fp32.json"]
    )
    ds = resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
    ds, _ = with_cpu_autocast(ds, "auto", torch.device("cpu"))
    assert precision_of(ds) == "bf16"
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []


def test_a_reduce_bucket_size_set_in_the_json_is_kept(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 10**6}}))
    assert resolve_deepspeed_config(str(path), 8)["zero_optimization"]["reduce_bucket_size"] == 10**6


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"bf16": {"enabled": True}}, r"enables DeepSpeed's bf16 mode.*\"dtype\": \"bfloat16\""),
        ({"fp16": {"enabled": True}}, r"enables DeepSpeed's fp16 mode.*\"dtype\": \"float16\""),
        ({"torch_autocast": {"enabled": True}}, r"torch_autocast.dtype is None; set one of"),
        ({"torch_autocast": {"enabled": True, "dtype": "int8"}}, r"torch_autocast.dtype is 'int8'"),
        (
            {"torch_autocast": {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": ["x.Y"]}},
            r"sets torch_autocast.lower_precision_safe_modules, whose gradients ZeRO would reduce in 16 bits",
        ),
        (
            {"torch_autocast": {"enabled": True, "dtype": "float16"}, "gradient_clipping": 1.0},
            r"gradient_clipping is 1.0 with fp16 autocast under ZeRO 1/2, which would clip the loss-scaled",
        ),
    ],
)
def test_engine_configs_that_would_lose_precision_are_refused(tmp_path, section, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **section}))
    cfg = load_config(REPO / "configs/demo.yaml", [f"engine.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=rf"engine.deepspeed_config: {path}.*{message}"):
        resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)


# --------------------------------------------------------------------------- losses under autocast


def test_losses_are_fp32_inside_a_bf16_autocast_forward():
    """InfoNCE and Barlow Twins are computed in fp32 from what the bf16 encoder and projectors produced."""
    cfg = load_config(
        REPO / "configs/demo.yaml",
        ["loss.type=bt", "loss.bt.impl=torch", "loss.bt.proj_dims=[64, 64]", "loss.weights=[1, 1, 1, 1]"],
    )
    torch.manual_seed(0)
    model = MoCoILM(cfg.model, cfg.moco, cfg.loss)
    captured = {}
    model.encoder.head.register_forward_hook(lambda m, i, out: captured.update(embedding=out))
    for i, proj in enumerate(model.intermediate.projectors):
        proj.register_forward_hook(
            lambda m, i_, out, i=i: captured.setdefault("z", {}).setdefault(i, []).append(out)
        )
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        keys = model.key_features(model.encoder, images.flip(0))
        captured.clear()
        queue = torch.nn.functional.normalize(torch.randn(48, cfg.moco.dim), dim=1)
        terms = model(images, keys, queue)
    assert captured["embedding"].dtype == torch.bfloat16  # the encoder did run in bf16
    q = torch.nn.functional.normalize(captured["embedding"].double(), dim=1)
    want = info_nce(moco_logits(q, keys[0].double(), queue.double(), cfg.moco.temperature).double())
    assert terms["moco"].dtype == torch.float32
    assert terms["moco"].item() == pytest.approx(want.item(), rel=1e-6)
    z1 = torch.stack([captured["z"][i][0] for i in range(4)]).double()
    z2 = torch.stack([captured["z"][i][1] for i in range(4)]).double()
    bt_want = bt_xcorr_loss_reference(
        z1, z2, torch.full((4,), 1 / 32).double(), torch.full((4,), 1 / 32).double()
    )
    bt_got = torch.stack([terms[f"bt_block{b}"] for b in (1, 2, 3, 4)])
    assert bt_got.dtype == torch.float32
    torch.testing.assert_close(bt_got.double(), bt_want, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- launcher runs


def fp32_masters(out: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of checkpoint ``tag``, reassembled by DeepSpeed from the ZeRO partitions."""
    select_accelerator()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def check_master_weights(out: Path, last: int) -> None:
    """``backbone.pt`` is fp32 and equals the final masters; the EMA read the previous step's masters."""
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in backbone.values() if t.is_floating_point())
    masters = fp32_masters(out, f"step_{last}")
    prefix = "encoder.backbone."
    params = {k.removeprefix(prefix): v for k, v in masters.items() if k.startswith(prefix)}
    assert params and set(params) <= set(backbone)
    for name, master in params.items():
        assert torch.equal(backbone[name], master), name
    states = torch.load(out / f"checkpoints/step_{last}/mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    for name in set(backbone) - set(params):  # BatchNorm statistics: fp32 in the engine and in the export
        assert module[prefix + name].dtype == backbone[name].dtype, name
        assert torch.equal(backbone[name], module[prefix + name]), name
    # moco.momentum=0: the key encoder of step N is the query's weights after step N-1
    key = states["moco"]["key_encoder"]  # the MoCo state travels in DeepSpeed's client state
    previous = fp32_masters(out, f"step_{last - 1}")
    rounded = total = 0
    for name, master in previous.items():
        if name.startswith("encoder."):
            assert torch.equal(key[name], master), name
            rounded += int((master.bfloat16().float() != master).sum())
            total += master.numel()
    assert rounded > 0.9 * total, "a bf16 copy of these masters would differ from them almost everywhere"


@pytest.fixture(scope="module")
def bf16_zero1(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_zero1")
    proc = pretrain(out, "bf16_zero1", 2)
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_bf16_zero1_keeps_fp32_masters_for_the_ema_and_the_export(bf16_zero1):
    out, log = bf16_zero1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    check_master_weights(out, last=2)
    assert (
        "plan: 2 steps (train.max_steps; 0.0312 x 64 steps/epoch); global batch 8 = 4/rank x 2 ranks" in log
    )


@pytest.mark.slow
def test_bf16_running_statistics_track_an_fp32_run(bf16_zero1, tmp_path):
    """Same start, same batches, weights held (lr 1e-6): only the forward's precision differs.

    Tolerance 2u (u = 2^-8, bf16's unit roundoff), relative for variances, in units of the channel's std
    for means. With autocast the statistics are fp32 averages of bf16-rounded activations, whose
    independent rounding errors average out; this run measured 0.62u (variances) and 0.49u (means) over
    ResNet-18's 20 BatchNorms. Statistics stored in bf16 instead (DeepSpeed's bf16 mode with
    ``data_types.buffer_dtype``, the previous configs) round every update to 8 bits: the same run was
    2.6u off in the variances.
    """
    out, _ = bf16_zero1
    reference = tmp_path / "fp32"
    pretrain(reference, "fp32", 2, "train.ckpt_every=0")
    got = torch.load(out / "backbone.pt", weights_only=True)
    want = torch.load(reference / "backbone.pt", weights_only=True)
    variances = [k for k in want if k.endswith("running_var")]
    assert variances and all(got[k].dtype == torch.float32 for k in variances)
    moved = max(float((want[k] - 1).abs().max()) for k in variances)
    assert moved > 0.1, (
        "the statistics must have moved from their initial values for the test to mean anything"
    )
    means = [k.replace("running_var", "running_mean") for k in variances]
    var_error = max(float(((got[v] - want[v]).abs() / want[v]).max()) for v in variances)
    mean_error = max(
        float(((got[m] - want[m]).abs() / want[v].sqrt()).max())
        for m, v in zip(means, variances, strict=True)
    )
    assert var_error <= 2 * BF16_UNIT_ROUNDOFF, var_error
    assert mean_error <= 2 * BF16_UNIT_ROUNDOFF, mean_error


@pytest.mark.slow
def test_bf16_zero1_resumes_on_another_world_size(bf16_zero1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(bf16_zero1[0], out)
    proc = pretrain(out, "bf16_zero1", 3, "--resume", num_procs=1)
    log = proc.stdout + proc.stderr
    assert (
        "resuming on 1 ranks x batch 4 (checkpoint: 2 x 4): data re-sharded, 16 samples of epoch 0 done"
        in log
    )
    assert "resumed at step 2 (epoch 0, batch 4 of the epoch)" in log
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    check_master_weights(out, last=3)  # the resumed module refreshed ZeRO's fp32 partition exactly


@pytest.mark.slow
def test_bf16_zero2_keeps_fp32_masters_for_the_ema_and_the_export(tmp_path):
    pretrain(tmp_path, "bf16_zero2", 2, "data.batch_size=2")
    check_master_weights(tmp_path, last=2)


# --------------------------------------------------------------------------- ZeRO's gradient reduction


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """tests/dist_scripts/zero_precision.py on 2 ranks: bf16 ZeRO-1 and ZeRO-2 steps, fp16 ZeRO-1 steps."""
    out = tmp_path_factory.mktemp("zero_precision")
    run_deepspeed("tests/dist_scripts/zero_precision.py", [str(out), *TINY[:4], "data.num_workers=0"])
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16_zero1", "bf16_zero2"])
def test_zero_reduces_autocast_gradients_in_fp32(zero_runs, name):
    """DeepSpeed's reduced gradient against the exact mean of the 2 ranks' local gradients (computed without
    DeepSpeed), per element relative to the mean of their magnitudes: one fp32 rounding of the sum is at
    most u = 2^-24. With DeepSpeed's default, which tags conv/linear weights with a bf16 comm dtype and
    reduces them in a bucket of their own, it was 65,281 u (2^-8, bf16's rounding)."""
    run = zero_runs[name]
    assert run["bucket_dtypes"] == ["torch.float32"]
    assert run["max_error_u"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "buffers"), [("bf16_zero1", 1), ("bf16_zero2", 2)])
def test_zero_reduction_buffers_are_25_mib(zero_runs, name, buffers):
    """The buffers ZeRO allocated during the backward: one of 25 MiB, two with ZeRO-2's overlap_comm.
    DeepSpeed's default allocated 5e8 fp32 elements per buffer and per bucket dtype: 4 GB (ZeRO-1) and
    8 GB (ZeRO-2) for this 11.5 M-parameter model."""
    run = zero_runs[name]
    assert run["reduce_bucket_size"] == REDUCE_BUCKET_ELEMENTS
    assert run["bucket_buffers"] == {"torch.float32": [[REDUCE_BUCKET_ELEMENTS, "torch.float32"]] * buffers}


@pytest.mark.slow
def test_fp16_zero_loss_scale_backs_off_after_an_overflow(zero_runs):
    """Each step that DeepSpeed skipped for an inf/NaN gradient leaves the weights as they were and halves
    the scale, resetting the growth count; an applied step keeps the scale and counts one more (torch's
    GradScaler.update, growth_interval 2000). The inf put into one gradient on rank 1 skips the step on rank
    0 too, and the steps after it apply. Before, the scale stayed at its initial 2^16 and here every step
    was skipped."""
    records = zero_runs["fp16_zero1"]
    assert records[0]["scale"] == 2.0**16 and records[0]["skipped"] == 0  # GradScaler's init_scale
    applied = []
    for before, after in pairwise(records):
        skipped = after["skipped"] - before["skipped"]
        assert skipped in (0, 1)
        if skipped:
            assert after["scale"] == before["scale"] * 0.5 and after["_growth_tracker"] == 0
            assert after["weights"] == before["weights"]
        else:
            assert after["scale"] == before["scale"]
            assert after["_growth_tracker"] == before["_growth_tracker"] + 1
            assert after["weights"] != before["weights"]
        applied.append(not skipped)
    inf_at = next(i for i, r in enumerate(records[1:]) if r["inf"])
    assert any(applied[:inf_at]), (
        "the scale must fit the gradients before the inf for the test to mean anything"
    )
    assert not applied[inf_at] and all(applied[inf_at + 1 :]), applied

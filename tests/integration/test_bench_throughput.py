"""The end-to-end throughput benchmark (bench/pretrain_throughput.py) at CPU size, and its step timer."""

import time

import pytest
import torch

from ilm_dist.train.timing import StepTimer
from tests.launcher import run_bench

PHASES = {"data", "to_device", "ema", "key_forward", "forward", "loss", "backward", "optimizer", "queue"}


def test_disabled_step_timer_does_nothing():
    timer = StepTimer(torch.device("cpu"))
    assert timer.phase("forward") is timer.phase("backward")  # one shared null context, no allocation
    with timer.phase("forward"), timer.phase("nested is fine when off"):
        timer.split("loss")
    assert timer.finish_step() == {}


def test_enabled_step_timer_adds_up_phases_and_splits_after_a_module():
    timer = StepTimer(torch.device("cpu"), enabled=True)
    encoder = torch.nn.Identity()
    timer.split_after(encoder, "loss")
    with timer.phase("forward"):
        time.sleep(0.01)
        encoder(torch.zeros(1))
        time.sleep(0.02)
    with timer.phase("forward"):
        time.sleep(0.005)
    ms = timer.finish_step()
    assert set(ms) == {"forward", "loss"}
    assert 15 <= ms["forward"] < 200 and 20 <= ms["loss"] < 200
    assert timer.finish_step() == {}
    with pytest.raises(RuntimeError, match="inside phase"), timer.phase("a"), timer.phase("b"):
        pass


@pytest.mark.slow
def test_cpu_benchmark_writes_the_documented_json(packed_tiny, tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--shards", str(packed_tiny), "--arch", "resnet18", "--size", "32", "--batch", "4"]
    args += ["--steps", "2", "--warmup", "1", "--threads", "1", "--curve-steps", "2", "--out", str(out)]
    args += ["--set", "loss.bt.proj_dims=[64, 64]", "moco.queue_size=64"]
    result = run_bench("pretrain_throughput.py", args, out)
    assert {"device", "commit", "command", "variants", "ratios", "model_flops_per_step"} <= result.keys()
    assert set(result["variants"]) == {"baseline", "ilm_dist", "synthetic"}
    for variant in result["variants"].values():
        assert set(variant["by_loss"]) == {"bt", "mse"}
        for run in variant["by_loss"].values():
            assert run["samples_per_s"] > 0
            assert set(run["phases_ms"]) == PHASES
            assert sum(run["phases_ms"].values()) == pytest.approx(run["step_ms"], rel=0.1)
            assert run["mfu"] is None  # no peak FLOP/s on a CPU
            assert run["peak_mem_bytes"] is None or run["peak_mem_bytes"] > 0
    assert all(flops > 0 for flops in result["model_flops_per_step"].values())
    assert set(result["ratios"]["bt"]) == {"ilm_dist/baseline", "ilm_dist/synthetic"}
    for curve in result["loss_curve"].values():  # fp32 on both sides on a CPU: the same computation
        assert curve["steps"] == 2 and curve["match"]
        assert curve["relative"] < 1e-4, curve["terms"]
        # the noise reference: the baseline from another seed drifts much further than ilm_dist does
        assert set(curve["noise"]) == set(curve["terms"]) and curve["within_noise"]
        assert curve["noise"]["loss"]["relative"] > 100 * curve["relative"]
        assert set(curve["loss"]) == {"baseline", "ilm_dist", "baseline_other_seed"}

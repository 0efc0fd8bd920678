"""bench/cpu_step.py at toy size: it runs every variant, writes the documented JSON, and its ratios
and bf16 check are computed from what it measured."""

import argparse
import statistics
import sys

import pytest

from tests.launcher import REPO, run_bench

sys.path.insert(0, str(REPO / "bench"))
import cpu_step

VARIANTS = {
    "deepspeed",
    "no_reduce",
    "no_reduce_channels_last",
    "no_reduce_bf16_autocast",
    "no_reduce_channels_last_bf16_autocast",
    "no_reduce_threads1",
}


@pytest.mark.slow
def test_cpu_step_benchmark_writes_the_documented_json(packed_tiny, tmp_path):
    out = tmp_path / "cpu_step.json"
    args = ["--shards", str(packed_tiny), "--rounds", "2", "--steps", "1", "--warmup", "0"]
    args += ["--set", "data.image_size=32", "data.batch_size=2", "moco.queue_size=16", "moco.dim=16"]
    args += [
        "--data",
        "--workers",
        "0",
        "--data-batches",
        "2",
        "--e2e",
        "1:0",
        "--profile",
        "--out",
        str(out),
    ]
    result = run_bench("cpu_step.py", args, out)
    assert {"device", "commit", "command", "settings", "load_avg", "variants", "ratios"} <= result.keys()
    assert set(result["variants"]) == VARIANTS
    ref = result["variants"]["deepspeed"]["rounds_ms"]
    for name, variant in result["variants"].items():
        assert len(variant["rounds_ms"]) == 2 and variant["samples_per_s"] > 0
        if name != "deepspeed":
            per_round = [r / t for r, t in zip(ref, variant["rounds_ms"], strict=True)]
            ratio = result["ratios"][f"{name}/deepspeed"]
            assert ratio["median"] == pytest.approx(statistics.median(per_round), abs=2e-3)
            assert ratio["range"][0] <= ratio["median"] <= ratio["range"][1]
    assert set(result["bf16_accuracy"]) == {
        "no_reduce_bf16_autocast",
        "no_reduce_channels_last_bf16_autocast",
    }
    for accuracy in result["bf16_accuracy"].values():
        assert accuracy["loss_relative_diff"] == pytest.approx(
            abs(accuracy["loss_bf16"] - accuracy["loss_fp32"]) / abs(accuracy["loss_fp32"]), rel=1e-6
        )
        assert -1.0 <= accuracy["grad_cosine"] <= 1.0 + 1e-9  # at batch 2 BatchNorm makes bf16 far off fp32
        assert accuracy["grad_relative_l2"] > 0
    diffs = result["first_step_max_abs_weight_diff"]
    assert diffs["no_reduce"] == 0.0  # at world size 1 the all-reduce changes nothing: same update, bitwise
    assert diffs["no_reduce_bf16_autocast"] > 0.0  # bf16 is another computation
    data = result["data"]
    assert set(data["loader_samples_per_s"]) == {"config_aug/workers0", "crop_flips_only/workers0"}
    costs = data["ms_per_view_1core"]
    assert set(costs) >= {"decode", "crop_flips", "+hue", "+blur", "config"} and costs["decode"] > 0
    stages = [v for k, v in costs.items() if k != "decode"]
    assert all(set(v) == {"per_image", "batched"} and min(v.values()) > 0 for v in stages)
    e2e = data["end_to_end_samples_per_s"]
    assert set(e2e) == {"config_aug/threads1_workers0", "crop_flips_only/threads1_workers0"}
    assert all(v > 0 for v in e2e.values())
    profile = result[
        "profile"
    ]  # the step's most expensive ops, most expensive first, a convolution among them
    times = [row["self_cpu_ms"] for row in profile]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert any("conv" in row["op"] for row in profile) and all(row["calls"] >= 1 for row in profile)


class RecordingVariant:
    """Stands in for a StepVariant: records when it ran, takes 1 ms per step."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def run(self, batches, count):
        self.calls.append(self.name)
        return [(1.0, 1.0)] * count


def test_rounds_alternate_the_variant_order_so_no_variant_always_follows_the_same_one():
    calls: list[str] = []
    variants = {
        name: RecordingVariant(name, calls) for name in ("deepspeed", "no_reduce", "no_reduce_threads1")
    }
    args = argparse.Namespace(rounds=3, warmup=0, steps=2)
    results = cpu_step.time_variants(args, variants, [argparse.Namespace(view1=[0] * 8)])
    timed = calls[1::2]  # each variant runs warm-up, then its timed steps
    forward = ["deepspeed", "no_reduce", "no_reduce_threads1"]
    assert timed == [*forward, *reversed(forward), *forward]
    assert all(r["samples_per_s"] == 8000.0 and len(r["rounds_ms"]) == 3 for r in results.values())


def test_a_given_config_keeps_its_own_sizes_and_the_preset_gets_the_documented_ones(packed_tiny, tmp_path):
    def cfg(config):
        args = argparse.Namespace(shards=packed_tiny, config=config, set=[])
        return cpu_step.bench_config(args, tmp_path / "run")

    recipe = cfg("configs/experiments/cpu/idc.yaml")
    assert (recipe.data.image_size, recipe.moco.queue_size, recipe.aug.color_jitter_p) == (32, 1024, 0.0)
    preset = cfg(None)
    assert (preset.model.arch, preset.data.image_size, preset.data.batch_size, preset.moco.queue_size) == (
        "resnet18",
        64,
        64,
        4096,
    )
    assert recipe.data.num_workers == preset.data.num_workers == 0  # in-memory batches

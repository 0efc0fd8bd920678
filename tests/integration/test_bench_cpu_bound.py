"""bench/cpu_bound.py at toy size: 1 and 2 ranks through the real launchers, the documented JSON, ratios
computed from the rounds it measured, and each rank's placement read back."""

import statistics

import pytest

from ilm_dist.cpu_placement import available_cores, plan_placement
from tests.launcher import run_bench


@pytest.mark.slow
def test_cpu_bound_benchmark_writes_the_documented_json(packed_tiny, tmp_path):
    out = tmp_path / "bound.json"
    args = ["--config", "configs/demo.yaml", "--shards", str(packed_tiny), "--ranks", "1", "2"]
    args += ["--placement", "ilm_dist", "--rounds", "2", "--steps", "2", "--warmup", "1", "--out", str(out)]
    args += ["--set", "data.image_size=32", "data.batch_size=4", "moco.queue_size=16", "data.num_workers=0"]
    result = run_bench("cpu_bound.py", args, out)
    assert {"device", "cpu", "torch", "commit", "command", "load_avg", "settings", "results"} <= result.keys()
    assert {"model", "cores", "amx_bf16", "torch_cpu_capability"} <= result["cpu"].keys()
    assert set(result["results"]) == {"ilm_dist/1_ranks", "ilm_dist/2_ranks"}
    for ranks in (1, 2):
        run = result["results"][f"ilm_dist/{ranks}_ranks"]
        plan = plan_placement(ranks, 0, cores=available_cores())
        assert run["placement"] == plan.describe()
        cores = [list(plan.cores_of(r)) if plan.bound else list(available_cores()) for r in range(ranks)]
        assert run["placement_read_back_per_rank"] == [{"threads": plan.threads, "cores": c} for c in cores]
        variants = run["variants"]
        assert set(variants) == {"bound", "ilm_step", "ilm_with_data"}
        bound = variants["bound"]["rounds_ms"]
        for name in ("ilm_step", "ilm_with_data"):
            per_round = [b / x for b, x in zip(bound, variants[name]["rounds_ms"], strict=True)]
            ratio = run["ratio_to_bound"][name]
            assert ratio["median"] == pytest.approx(statistics.median(per_round), abs=2e-3)
            assert ratio["range"][0] <= ratio["median"] <= ratio["range"][1]
        for variant in variants.values():
            assert len(variant["rounds_ms"]) == 2 and variant["samples_per_s"] > 0
            expected = 4 * ranks / variant["step_ms"] * 1e3  # two-view samples per second, all ranks
            assert variant["samples_per_s"] == pytest.approx(expected, rel=0.02)
        assert 0 <= run["loader_wait_share"] < 1

"""CPU placement (ilm_dist.cpu_placement): the plan for 1-3 ranks, overrides, and what a process runs with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ilm_dist.config import ConfigError, load_config
from ilm_dist.cpu_placement import (
    CpuConfig,
    available_cores,
    cpu_has_amx,
    local_ranks,
    plan_placement,
    split_cores,
)
from ilm_dist.errors import InputError
from ilm_dist.processes import ResourcesConfig, module_command
from ilm_dist.train.engine import precision_of, with_cpu_autocast
from tests.launcher import REPO

TWO, SIXTEEN = (0, 1), tuple(range(16))


@pytest.mark.parametrize(
    ("cores", "ranks", "blocks"),
    [
        (TWO, 1, ((0, 1),)),
        (TWO, 2, ((0,), (1,))),
        (TWO, 3, ((0,), (1,), (0,))),  # fewer cores than ranks: round-robin, one core each
        (SIXTEEN, 3, ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14))),  # core 15 spare
        ((4, 5, 9, 10), 2, ((4, 5), (9, 10))),  # a restricted mask keeps its own core numbers
    ],
)
def test_cores_are_split_into_one_equal_block_per_rank(cores, ranks, blocks):
    assert split_cores(cores, ranks) == blocks


@pytest.mark.parametrize(
    ("cores", "ranks", "workers", "gpu", "threads", "text"),
    [
        (TWO, 1, 0, False, 2, "1 rank x 2 threads, cores 0-1, 0 loader workers x 1 thread per rank"),
        (TWO, 1, 1, False, 2, "1 rank x 2 threads, cores 0-1, 1 loader worker x 1 thread per rank"),
        (TWO, 2, 0, False, 1, "2 ranks x 1 thread, cores 0/1, 0 loader workers x 1 thread per rank"),
        (TWO, 2, 1, False, 1, "2 ranks x 1 thread, cores 0/1, 1 loader worker x 1 thread per rank"),
        (TWO, 3, 1, False, 1, "3 ranks x 1 thread, cores 0/1/0, 1 loader worker x 1 thread per rank"),
        (
            SIXTEEN,
            2,
            4,
            False,
            8,
            "2 ranks x 8 threads, cores 0-7/8-15, 4 loader workers x 1 thread per rank",
        ),
        # a GPU rank leaves its loader workers their cores and keeps the rest, at least one
        (SIXTEEN, 2, 4, True, 4, "2 ranks x 4 threads, cores 0-7/8-15, 4 loader workers x 1 thread per rank"),
        (TWO, 2, 3, True, 1, "2 ranks x 1 thread, cores 0/1, 3 loader workers x 1 thread per rank"),
    ],
)
def test_plan_for_ranks_and_loader_workers(cores, ranks, workers, gpu, threads, text):
    placement = plan_placement(ranks, workers, cores=cores, gpu=gpu, environ={})
    assert placement.threads == threads and placement.bound
    # the busy threads of a CPU job never exceed the cores it has (beyond ranks sharing a core)
    assert placement.describe() == text
    if not gpu and ranks <= len(cores):
        assert ranks * placement.threads <= len(cores)


def test_config_threads_win_and_are_reported():
    placement = plan_placement(2, 1, CpuConfig(threads=3), cores=SIXTEEN, environ={})
    assert placement.threads == 3 and placement.source == "cpu.threads" and placement.bound
    assert placement.describe().endswith("(threads from cpu.threads)")
    # over OMP_NUM_THREADS too; whoever set that keeps the binding
    placement = plan_placement(2, 1, CpuConfig(threads=3), cores=SIXTEEN, environ={"OMP_NUM_THREADS": "1"})
    assert (placement.threads, placement.source, placement.bound) == (3, "cpu.threads", False)


def test_environment_threads_win_and_leave_the_binding_to_whoever_set_them():
    placement = plan_placement(2, 1, cores=TWO, environ={"OMP_NUM_THREADS": "2"})
    assert (placement.threads, placement.source, placement.bound) == (2, "OMP_NUM_THREADS", False)
    assert placement.describe() == (
        "2 ranks x 2 threads, not bound, 1 loader worker x 1 thread per rank (threads from OMP_NUM_THREADS)"
    )


def test_bind_false_keeps_the_automatic_threads_unbound():
    placement = plan_placement(2, 0, CpuConfig(bind=False), cores=TWO, environ={})
    assert (placement.threads, placement.bound) == (1, False)


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_omp_num_threads_is_one_line_naming_it(value):
    with pytest.raises(InputError, match=rf"OMP_NUM_THREADS='{value}'[^\n]*positive whole number$"):
        plan_placement(1, 0, cores=TWO, environ={"OMP_NUM_THREADS": value})


def test_config_checks_cpu_threads(tmp_path):
    with pytest.raises(ConfigError, match=r"cpu\.threads: must be >= 1"):
        load_config(REPO / "configs/demo.yaml", [f"data.shards={tmp_path}", "cpu.threads=0"])
    cfg = load_config(
        REPO / "configs/demo.yaml", [f"data.shards={tmp_path}", "cpu.threads=2", "cpu.bind=false"]
    )
    assert cfg.cpu == CpuConfig(threads=2, bind=False)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (0, 1)),
        ({"LOCAL_RANK": "1", "LOCAL_SIZE": "3"}, (1, 3)),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}, (2, 4)),
    ],
)
def test_local_ranks_from_the_launchers_environment(environ, expected):
    assert local_ranks(environ) == expected


READ_BACK = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from ilm_dist.cpu_placement import current_placement, place_this_process
place_this_process(1)
print(json.dumps(current_placement()))
"""


def place_in_a_fresh_process(**env: str) -> tuple[str, dict]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-c", READ_BACK],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    *log, last = proc.stdout.strip().splitlines()
    return "\n".join(log), json.loads(last)


def test_a_rank_runs_the_threads_and_cores_it_was_given():
    """Local rank 1 of 2, read back from torch and the OS in that process."""
    expected = plan_placement(2, 1, cores=available_cores(), environ={})
    log, got = place_in_a_fresh_process(LOCAL_RANK="1", LOCAL_SIZE="2")
    assert got == {"threads": expected.threads, "cores": list(expected.cores_of(1))}
    assert log == ""  # only local rank 0 announces the plan


def test_local_rank_zero_announces_the_plan_and_an_override_is_read_back():
    log, got = place_in_a_fresh_process(LOCAL_RANK="0", LOCAL_SIZE="2", OMP_NUM_THREADS="3")
    assert got == {"threads": 3, "cores": list(available_cores())}  # not bound: the caller's cores
    assert (
        log == "cpu placement: 2 ranks x 3 threads, not bound, 1 loader worker x 1 thread per rank "
        "(threads from OMP_NUM_THREADS)"
    )


@pytest.mark.parametrize(
    ("cpus", "ranks", "expected"), [(None, 1, None), (1.0, 1, "1"), (1.0, 2, "1"), (0.5, 1, "1")]
)
def test_a_command_given_a_share_of_the_machine_gets_its_threads(cpus, ranks, expected, monkeypatch):
    """Sweep trials and experiment cells (ilm_dist.processes): the whole machine leaves the ranks to place
    themselves; a share sets OMP_NUM_THREADS (the ranks then report it and leave binding to the caller)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("ilm_dist.processes.available_cores", lambda: (0, 1))
    resources = ResourcesConfig(cpus=2.0 if cpus is None else cpus, ranks=ranks)
    _, env = module_command(["ilm_dist.pretrain"], resources)
    assert env.get("OMP_NUM_THREADS") == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the caller's own setting stays
    assert module_command(["ilm_dist.pretrain"], resources)[1]["OMP_NUM_THREADS"] == "7"


@pytest.mark.parametrize(
    ("mode", "device", "amx", "ds", "precision", "note"),
    [
        ("auto", "cpu", True, {}, "bf16", "bf16 autocast, this CPU has AMX"),
        ("auto", "cpu", False, {}, "fp32", "fp32, this CPU has no AMX"),
        ("none", "cpu", True, {}, "fp32", ""),
        ("auto", "cuda", True, {}, "fp32", ""),  # GPUs: the DeepSpeed config decides
        ("auto", "cpu", True, {"torch_autocast": {"enabled": True, "dtype": "float16"}}, "fp16", ""),
    ],
)
def test_cpu_autocast_auto_picks_bf16_on_amx_cpus_only(mode, device, amx, ds, precision, note, monkeypatch):
    monkeypatch.setattr("ilm_dist.train.engine.cpu_has_amx", lambda: amx)
    config, reason = with_cpu_autocast(ds, mode, torch.device(device))
    assert precision_of(config) == precision and reason.endswith(note)
    assert ds == {} or "torch_autocast" in ds  # the caller's dict is not changed


def test_cpu_has_amx_reads_the_flags_of_this_cpu():
    text = Path("/proc/cpuinfo").read_text()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    assert cpu_has_amx() == (" amx_bf16" in flags)


def test_a_bad_omp_num_threads_stops_pretraining_with_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/demo.yaml", "data.backend=synthetic", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "two"}
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert lines == ["error: environment variable OMP_NUM_THREADS='two': expected a positive whole number"]
    assert not out.exists()

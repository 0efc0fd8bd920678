"""Runs and checkpoints from other people, full disks and reused output directories (issue: trustworthy runs).

Every case ends with one ``error: ...`` line naming the file or directory, exit status 2, and nothing
else changed: the run directory's files are compared by checksum before and after.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ilm_dist.errors import InputError
from ilm_dist.eval.weights import load_state, resolve_init
from ilm_dist.serialization import load_tensors
from tests.launcher import REPO, cpu_env, read_metrics, run_deepspeed

pytestmark = pytest.mark.slow

TINY = [
    "--config",
    "configs/demo.yaml",
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=8",
    "data.synthetic.num_samples=256",
    "moco.queue_size=48",
    "train.log_every=1",
]


def pretrain(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """One process, ``python launch/pretrain.py`` on the synthetic backend."""
    cmd = [sys.executable, "launch/pretrain.py", *TINY, f"output_dir={out}", *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=cpu_env(**(env or {})), capture_output=True, text=True, timeout=300
    )


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks by target), by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = pretrain(out, "train.max_steps=4", "train.ckpt_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def with_payload(src: Path, dst: Path, marker: Path) -> None:
    state = torch.load(src, map_location="cpu", weights_only=False)  # our own trusted test file
    state["evil"] = Payload(marker)
    torch.save(state, dst)


# --------------------------------------------------------------------------- code execution


def test_a_payload_in_any_file_we_load_runs_nothing(run, tmp_path):
    marker = tmp_path / "PWNED"
    ds_file = tmp_path / "step" / "mp_rank_00_model_states.pt"
    ds_file.parent.mkdir()
    with_payload(run / "checkpoints/step_4/mp_rank_00_model_states.pt", ds_file, marker)
    backbone = tmp_path / "backbone.pt"
    with_payload(run / "backbone.pt", backbone, marker)
    legacy = tmp_path / "moco_state.pt"
    torch.save({"queue": torch.zeros(2), "evil": Payload(marker)}, legacy)

    with pytest.raises(InputError, match=r"mp_rank_00_model_states\.pt: refused .* posix\.system"):
        load_state(resolve_init(str(ds_file)))
    with pytest.raises(InputError, match=r"backbone\.pt: refused .* posix\.system"):
        load_state(resolve_init(str(backbone)))
    with pytest.raises(InputError, match=r"moco_state\.pt: refused .* posix\.system"):
        load_tensors(legacy, "MoCo state")
    # the reference: an unsafe load of the same file does run the payload
    torch.load(legacy, weights_only=False)
    assert marker.exists()


def test_resume_from_a_poisoned_checkpoint_runs_nothing(run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(out)], check=True)
    marker = tmp_path / "PWNED"
    target = out / "checkpoints/step_4/mp_rank_00_model_states.pt"
    with_payload(target, target, marker)
    before = tree(out)
    proc = pretrain(out, "--resume", "train.max_steps=6")
    assert_one_line_error(proc, str(target), "refused", "posix.system")
    assert not marker.exists()
    assert tree(out) == before


# --------------------------------------------------------------------------- reused output_dir


def test_a_second_run_on_a_running_runs_output_dir_is_refused_naming_it(packed_tiny, tmp_path):
    """Even with --overwrite, a run started on the output_dir of a live run stops at once naming it (pid, host),
    and the live run's files stay its own. Then a SIGTERM to the live run's whole process group (what `timeout`
    and schedulers send; its loader worker gets it too) ends it with one line and no traceback."""
    live = [
        f"data.shards={packed_tiny}",
        "data.backend=torch",
        "data.num_workers=1",
        "train.max_steps=100000",
    ]
    cmd = [sys.executable, "launch/pretrain.py", *TINY, f"output_dir={tmp_path}", *live]
    first = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and read_metrics(tmp_path / "metrics.jsonl"))
        proc = pretrain(tmp_path, "--overwrite", "train.max_steps=4", "seed=7")
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
        os.killpg(first.pid, signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert_one_line_error(proc, f"{tmp_path} is in use by pretraining run pid {first.pid} on ")
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))
    assert "max_steps: 100000" in (tmp_path / "config.yaml").read_text()
    assert first.returncode == 4 and "Traceback" not in stderr, stderr[-3000:]
    (stop,) = [line for line in stderr.splitlines() if "ERROR" in line]
    assert stop.endswith("terminated by SIGTERM (by a scheduler, timeout or kill); last checkpoint: none"), (
        stop
    )


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_new_run_refuses_an_output_dir_that_holds_a_run(run):
    before = tree(run)
    proc = pretrain(run, "train.max_steps=4")
    assert_one_line_error(proc, f"output_dir {run} holds an earlier run", "--resume", "--overwrite")
    assert tree(run) == before


def test_overwrite_starts_over_and_says_what_it_deleted(run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(out)], check=True)
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    proc = pretrain(out, "--overwrite", "train.max_steps=2", "train.ckpt_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's config.yaml, metrics.jsonl" in proc.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_2"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("damage", "extra", "fragments"),
    [
        (
            "none",
            ["model.arch=resnet34"],
            ["changes what the run in", "model.arch: 'resnet18' -> 'resnet34'"],
        ),
        (
            "none",
            ["data.synthetic.num_samples=512"],
            ["data: synthetic {", "'num_samples': 256", "'num_samples': 512"],
        ),
        (
            "none",
            ["loss.type=bt", "aug.vflip=true"],
            ["loss.type: 'mse' -> 'bt'", "aug.vflip: False -> True", "--allow-changes"],
        ),
        ("truncate", [], ["mp_rank_00_model_states.pt", "cannot read"]),
        ("no_latest", [], ["--resume: no checkpoint in", "checkpoints"]),
        ("none", ["moco.dim=64", "--allow-changes"], ["--resume:", "step_4 does not fit this run's model"]),
        ("binary_config", [], ["config.yaml: the run's saved config is not a UTF-8 text file"]),
    ],
)
def test_a_failed_resume_leaves_the_run_as_it_was(run, tmp_path, damage, extra, fragments):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(out)], check=True)
    states = out / "checkpoints/step_4/mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    if damage == "no_latest":
        (out / "checkpoints/latest").unlink()
    if damage == "binary_config":
        (out / "config.yaml").write_bytes(b"\xf6\x00\xff")
    before = tree(out)
    proc = pretrain(out, "--resume", "train.max_steps=6", *extra)
    assert_one_line_error(proc, *fragments)
    assert tree(out) == before


def test_a_deliberate_change_on_resume_is_recorded(run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(out)], check=True)
    proc = pretrain(out, "--resume", "--allow-changes", "train.max_steps=5", "data.synthetic.num_samples=512")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "resume_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 4
    (change,) = record["changes"]
    assert change.startswith("data: synthetic {") and "'num_samples': 512" in change
    assert "num_samples: 512" in (out / "config.yaml").read_text()


def test_after_a_crash_and_resume_every_step_is_logged_once(tmp_path):
    # killed at step 6 before its log line: metrics up to step 5, the last checkpoint at step 4
    crashed = pretrain(tmp_path, "train.max_steps=6", "train.ckpt_every=4", env={"ILM_DIST_FAULT": "step@6"})
    assert crashed.returncode != 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    proc = pretrain(tmp_path, "--resume", "train.max_steps=6", "train.ckpt_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 1 metric records logged after step 4" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- full disk


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(out)], check=True)
    before = tree(out / "checkpoints")
    # writes into step_6's model states fail with ENOSPC, as on a full disk
    full = out / "checkpoints/step_6/mp_rank_00_model_states.pt"
    full.parent.mkdir()
    full.symlink_to("/dev/full")
    proc = pretrain(out, "--resume", "train.max_steps=6", "train.ckpt_every=2")
    line = assert_one_line_error(proc, str(full), "No space left on device", "step_4 and 'latest' are intact")
    assert "removed the partial" in line
    assert not (out / "checkpoints/step_6").exists()
    assert tree(out / "checkpoints") == before  # step_2, step_4 and latest untouched
    resumed = pretrain(out, "--resume", "train.max_steps=6")  # the disk has room again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "checkpoints/latest").read_text() == "step_6"


# --------------------------------------------------------------------------- start-up errors


def test_a_split_smaller_than_one_global_batch_is_one_line(tmp_path):
    proc = pretrain(tmp_path, "data.synthetic.num_samples=6")
    assert_one_line_error(
        proc, "data.batch_size:", "too small for one optimizer step of 8 per rank x 1 ranks"
    )
    assert not any(tmp_path.iterdir())


def test_start_up_errors_exit_2_on_every_rank(tmp_path):
    """Every rank finds the error and reports the same one line with status 2 (the launcher stops the others as
    soon as the first exits, so a slower rank may be stopped before it prints)."""
    proc = run_deepspeed(
        "launch/pretrain.py", [*TINY, f"output_dir={tmp_path}", "--resume"], num_procs=2, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[0].startswith("error: --resume: no checkpoint in")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert json.dumps(tree(tmp_path)) == "{}"

"""bench/gpu_check.sh and its helpers: the dry run of every stage, the wheel parts, the device-call plan."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tests.launcher import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check
import gpu_wheels


def fake_wheel(folder: Path, name: str, version: str, package: str | None = None) -> Path:
    """A minimal valid pure-Python wheel holding ``package`` (default: ``name``) with an empty __init__."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    package = package or name
    files = {
        **{f"{'/'.join(package.split('.')[: i + 1])}/__init__.py": "" for i in range(package.count(".") + 1)},
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    return path


@pytest.fixture
def wheel_parts(tmp_path, monkeypatch):
    """Three fake wheels packed as make gpu-wheels packs them, in parts of at most 4 KiB."""
    wheels = [fake_wheel(tmp_path, f"pkg{i}", "1.0") for i in range(3)]
    wheels.append(fake_wheel(tmp_path, "nvcodec", "1.0", package="nvidia.codec"))  # ships nvidia/__init__.py
    monkeypatch.setattr(gpu_wheels, "MIB", 1024)  # PART_MIB "MiB" of 1 KiB: parts of <= 58 KiB
    monkeypatch.setattr(gpu_wheels, "PART_MIB", 2)
    parts = tmp_path / "parts"
    parts.mkdir()
    tar = tmp_path / "gpu-wheels.tar"
    gpu_wheels.write_tar(wheels, tar)
    manifest = {
        "python": "3.12",
        "platforms": list(gpu_wheels.PLATFORMS),
        "tar": {"file": tar.name, "bytes": tar.stat().st_size, "sha256": gpu_wheels.sha256(tar)},
        "parts": gpu_wheels.split(tar, parts),
        "wheels": [{"file": w.name, "name": w.name.split("-")[0], "version": "1.0"} for w in sorted(wheels)],
    }
    (parts / "manifest.json").write_text(json.dumps(manifest))
    return parts, tar.read_bytes()


def test_parts_reassemble_to_the_tar(wheel_parts):
    parts, tar_bytes = wheel_parts
    manifest = json.loads((parts / "manifest.json").read_text())
    assert len(manifest["parts"]) > 2 and all(p["bytes"] <= 2 * 1024 for p in manifest["parts"])
    joined = b"".join((parts / p["file"]).read_bytes() for p in manifest["parts"])
    assert joined == tar_bytes and hashlib.sha256(joined).hexdigest() == manifest["tar"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        assert tar.getnames() == sorted(w["file"] for w in manifest["wheels"])


def install(parts: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/gpu_check.py", "install-wheels", "--parts", str(parts), "--work", str(work)]
    return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_install_wheels_verifies_installs_and_reports_missing_or_corrupt_parts(wheel_parts, tmp_path):
    parts, _ = wheel_parts
    verified = install(parts, tmp_path / "w1", "--verify-only")
    assert verified.returncode == 0, verified.stderr
    assert json.loads((tmp_path / "w1/results/wheels.json").read_text())["status"] == "verified"
    installed = install(parts, tmp_path / "w2")
    # the fake wheels install; the import probe of deepspeed & co. passes only where they are installed
    report = json.loads((tmp_path / "w2/results/wheels.json").read_text())
    assert report["status"] == "installed" and installed.returncode == (0 if report["imports_ok"] else 1)
    assert (tmp_path / "w2/site/pkg0/__init__.py").is_file()
    assert "extend_path" in (tmp_path / "w2/site/nvidia/__init__.py").read_text()  # joins the node's nvidia/
    first = parts / "gpu-wheels.tar.00"
    first.write_bytes(b"x" + first.read_bytes()[1:])
    (parts / "gpu-wheels.tar.01").unlink()
    broken = install(parts, tmp_path / "w3")
    assert broken.returncode == 1
    assert "missing or corrupt: ['gpu-wheels.tar.00', 'gpu-wheels.tar.01']" in broken.stderr
    no_wheels = install(tmp_path / "nowhere", tmp_path / "w4")
    assert no_wheels.returncode == 77 and "no wheels were carried" in no_wheels.stdout


def test_plan_sends_one_part_per_call_and_respects_the_node_limits(wheel_parts, monkeypatch):
    parts, _ = wheel_parts
    count = len(json.loads((parts / "manifest.json").read_text())["parts"])
    monkeypatch.setattr(gpu_check, "ROOT", parts.parent)  # carried paths are relative to the repository root
    (parts.parent / ".whl").mkdir()
    (parts.parent / ".whl" / "parts").symlink_to(parts)
    calls = gpu_check.device_calls(parts)
    assert len(calls) == count
    assert [c["carry"][1] for c in calls] == [f".whl/parts/gpu-wheels.tar.{i:02d}" for i in range(count)]
    early = [c["stages"] for c in calls[:-1]]
    stages = [*gpu_check.EARLY_STAGES, *[["env"]] * count]  # calls beyond the early stages only carry
    assert early == [list(s) for s in stages[: count - 1]]
    assert "--stages" not in calls[-1]["command"] and calls[-1]["command"].endswith("gpu_check.sh $OUT")
    assert gpu_check.plan_problems(calls) == []
    monkeypatch.setattr(gpu_check, "CALL_BYTES", 100)
    assert any("more than 64 MiB" in p for p in gpu_check.plan_problems(calls))


def test_plan_without_wheels_is_one_call_carrying_nothing(tmp_path):
    (call,) = gpu_check.device_calls(tmp_path)
    assert call["carry"] == [] and "--stages" not in call["command"]


def meta(name: str, version: str, *requires: str) -> dict:
    return {"name": name, "version": version, "requires": list(requires)}


def test_wheel_closure_follows_markers_extras_and_versions(monkeypatch):
    monkeypatch.setattr(gpu_wheels, "NODE_HAS", {"numpy"})
    monkeypatch.setattr(gpu_wheels, "NOT_CARRIED", {"big-codec": "not needed"})
    metas = {
        "app": meta(
            "app", "1.0", "lib[gpu]>=2", "numpy", "old; python_version < '3.9'", "doc; extra == 'docs'"
        ),
        "lib": meta(
            "lib", "2.1", "jpeg; extra == 'gpu'", "big-codec; extra == 'gpu'", "tiff; extra == 'tiff'"
        ),
        "jpeg": meta("jpeg", "1.0"),
    }
    assert gpu_wheels.closure_errors(metas) == []
    metas["app"]["requires"].append("lib>=3")
    metas["lib"]["requires"].append("zlib-ng")
    errors = gpu_wheels.closure_errors(metas)
    assert any("app requires lib>=3, but lib 2.1 is carried" in e for e in errors)
    assert any("lib requires zlib-ng, which is neither carried nor on the node" in e for e in errors)


def run_gpu_check(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``bash bench/gpu_check.sh ARGS`` with this interpreter and a work folder under ``tmp_path``."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_prints_the_device_calls(tmp_path):
    out = tmp_path / "out"
    proc = run_gpu_check(tmp_path, "--dry-run", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == list(gpu_check.STAGES)
    for name, stage in stages.items():
        assert stage["status"] in ("passed", "skipped"), (name, stage["log_tail"])
        assert 0 <= stage["seconds"] <= stage["budget_s"] and isinstance(stage["log_tail"], str)
    assert stages["env"]["result"]["slug"] == "cpu"
    assert stages["wheels"]["status"] == (
        "passed" if (REPO / ".whl/parts/manifest.json").is_file() else "skipped"
    )
    assert {c["formulation"] for c in stages["op_bench"]["result"]["cases"]} == {"gram", "xcorr"}
    if stages["build"]["status"] == "passed":  # the extension is built here: its CPU kernel is registered
        assert stages["build"]["result"]["kernels"]["CPU"] is True
    cuda_tests = stages["op_tests"]["result"]["cuda"]
    assert cuda_tests["tests"] > 0 and cuda_tests["failures"] == cuda_tests["errors"] == 0
    assert stages["nccl"]["result"]["backend"] == "gloo" and stages["nccl"]["result"]["all_reduce"] == [
        0,
        1,
        2,
        3,
    ]
    assert set(stages["throughput"]["result"]["variants"]) == {"baseline", "ilm_dist", "synthetic"}
    assert stages["data_pipeline"]["result"]["variants"]["torch"]["samples_per_s"] > 0
    assert stages["bn_stats"]["result"]["configs"]["bf16"]["batch_norm_layers"] > 0
    assert stages["dali_buffers"]["result"]["intact"] is True
    epochs = stages["dali_epochs"]["result"]
    assert (
        len(epochs["epochs"]) == 3 and epochs["resume_replay"]["fresh"] == epochs["resume_replay"]["resumed"]
    )
    assert stages["train_step"]["result"]["engine"]["trainable_parameters"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= gpu_check.OUT_FILES
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert {f"logs/{name}.log" for name in gpu_check.STAGES} <= set(tar.getnames())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["problems"] == [] and plan["calls"]
    assert all(len(c["command"]) <= 2000 and len(c["carry"]) <= 8 for c in plan["calls"])
    assert "gpu_check.sh" in proc.stdout and "carry:" in proc.stdout


def test_gpu_mode_without_cuda_stops_after_env(tmp_path):
    """On the GPU node, torch seeing no CUDA device fails the check at once instead of running it on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("tests a machine without CUDA")
    out = tmp_path / "out"
    proc = run_gpu_check(tmp_path, "--stages", "env,nccl", str(out), timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "sees no CUDA device" in proc.stderr and "stopping before the other stages" in proc.stderr
    statuses = json.loads((out / "summary.json").read_text())["statuses"]
    assert statuses["env"] == "failed" and statuses["nccl"] == "not run"


def test_extension_stage_requires_a_cuda_kernel(tmp_path, monkeypatch, capsys):
    """The build stage's assertion: ilm_dist::bt_xcorr_loss has a CUDA kernel (a CUDA torch built without
    nvcc registers only the CPU one)."""
    from ilm_dist.ops import _extension

    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    registered = {"CPU"}
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel", lambda op: op == gpu_check.OP)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: key in registered)
    args = argparse.Namespace(out=tmp_path / "extension.json", require_cuda=True)
    with pytest.raises(SystemExit, match="no CUDA kernel for ilm_dist::bt_xcorr_loss"):
        gpu_check.cmd_extension(args)
    assert json.loads(args.out.read_text())["kernels"] == {"CPU": True, "CUDA": False}
    registered.add("CUDA")
    gpu_check.cmd_extension(args)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C")
    with pytest.raises(SystemExit) as skipped:
        gpu_check.cmd_extension(argparse.Namespace(out=args.out, require_cuda=False))
    assert skipped.value.code == 77  # not built: the dry run skips the stage


def test_op_tests_run_the_cuda_tests_first_and_record_them_at_once(tmp_path, monkeypatch):
    """The op_tests stage's cap cuts the CPU tests, not the CUDA ones: they run first, and their counts are
    in the result before the rest starts."""
    calls = []

    def fake_pytest(cmd, **kwargs):
        expression = cmd[cmd.index("-k") + 1]
        result = tmp_path / "op_tests.json"
        calls.append((expression, json.loads(result.read_text()) if result.is_file() else None))
        xml = Path(cmd[cmd.index("--junitxml") + 1])
        xml.write_text('<testsuite tests="2" failures="0" errors="0" skipped="0"></testsuite>')
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_pytest)
    gpu_check.cmd_op_tests(argparse.Namespace(out=tmp_path / "op_tests.json", cuda_only=False))
    assert [expression for expression, _ in calls] == ["cuda", "not cuda"]
    assert calls[1][1]["cuda"]["tests"] == 2  # written before the rest ran
    assert set(json.loads((tmp_path / "op_tests.json").read_text())) == {"cuda", "rest"}

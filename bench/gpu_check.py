"""The Python side of bench/gpu_check.sh: environment, wheels, NCCL start-up, stage records, summary, plan.

Subcommands (the shell script calls them; ``plan`` is also for people)::

    python bench/gpu_check.py env --out FILE [--require-cuda]   # device, driver, versions, cores
    python bench/gpu_check.py install-wheels --work DIR [--verify-only]
    python bench/gpu_check.py extension --out FILE [--require-cuda]  # ilm_dist._C and its kernels
    python bench/gpu_check.py op-tests --out FILE [--cuda-only]      # the op's tests, CUDA tests first
    python bench/gpu_check.py nccl --out FILE [--backend nccl]  # one-rank start-up through ilm_dist's engine
    python bench/gpu_check.py record --work DIR --name NAME --rc RC --seconds S --budget B --log FILE
    python bench/gpu_check.py summary --work DIR --out OUT_DIR [--mode gpu|dry-run]
    python bench/gpu_check.py plan                        # the commands to send to the GPU node

What comes back from the GPU node is at most 8 files, so ``summary`` writes to OUT_DIR only
``summary.json`` (every stage's status, seconds and log tail, with its result JSON embedded),
``gpu_check.tar.gz`` (every log and result) and each benchmark's JSON under its bench/results/ name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_PARTS = ROOT / ".whl" / "parts"
MIB = 2**20
# Limits of the commands sent to the GPU node.
CALL_BYTES = 64 * MIB  # the repository and everything carried
CALL_CHARS = 2000
CALL_CARRY = 8
OUT_FILES = 8
# Stages in run order, with their time caps in seconds on the GPU node (bench/gpu_check.sh enforces them
# and a total of TOTAL_S per invocation). The results each stage writes, under the work folder's results/.
STAGES = {
    "env": (20, "env.json"),
    "wheels": (60, "wheels.json"),
    "build": (120, "extension.json"),
    "op_tests": (75, "op_tests.json"),
    "op_bench": (45, "xcorr.json"),
    "nccl": (30, "nccl.json"),
    "data": (30, None),
    "throughput": (180, "pretrain_throughput.json"),
    "data_pipeline": (60, "data_pipeline.json"),
    "bn_stats": (45, "bn_stats.json"),
    "dali_buffers": (45, "dali_buffers.json"),
    "dali_epochs": (60, "dali_epochs.json"),
    "train_step": (60, "train_step.json"),
}
TOTAL_S = 530
# Result JSONs copied into OUT_DIR as bench/results/<prefix>_<device>.json.
RESULT_PREFIX = {"op_bench": "xcorr", "throughput": "pretrain_throughput", "data_pipeline": "data_pipeline"}
RESULT_PREFIX["bn_stats"] = "bn_stats"
# The device calls: stages run before the last call while the wheel parts travel (no wheels needed).
EARLY_STAGES = (["env", "build"], ["op_tests"], ["op_bench"])
LOG_TAIL_CHARS = 4000


def main() -> None:
    args = parse_args()
    args.func(args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)
    env = sub.add_parser("env", help="device and software versions")
    env.add_argument("--out", type=Path, required=True)
    env.add_argument("--require-cuda", action="store_true", help="fail when torch sees no CUDA device")
    env.set_defaults(func=cmd_env)
    ext = sub.add_parser("extension", help="ilm_dist._C: loads, and which devices have kernels")
    ext.add_argument("--out", type=Path, required=True)
    ext.add_argument("--require-cuda", action="store_true", help="fail without a CUDA kernel")
    ext.set_defaults(func=cmd_extension)
    op_tests = sub.add_parser("op-tests", help="tests/ops/test_xcorr_op.py, the CUDA tests first")
    op_tests.add_argument("--out", type=Path, required=True)
    op_tests.add_argument("--cuda-only", action="store_true", help="only the CUDA tests")
    op_tests.set_defaults(func=cmd_op_tests)
    wheels = sub.add_parser("install-wheels", help="reassemble, verify and install the carried wheel parts")
    wheels.add_argument("--work", type=Path, required=True)
    wheels.add_argument("--parts", type=Path, default=WHEEL_PARTS)
    wheels.add_argument("--verify-only", action="store_true", help="check parts and wheel tags, install none")
    wheels.set_defaults(func=cmd_install_wheels)
    nccl = sub.add_parser("nccl", help="one-rank process-group start-up through ilm_dist")
    nccl.add_argument("--out", type=Path, required=True)
    nccl.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    nccl.set_defaults(func=cmd_nccl)
    record = sub.add_parser("record", help="write one stage's record")
    record.add_argument("--work", type=Path, required=True)
    record.add_argument("--name", choices=STAGES, required=True)
    record.add_argument("--rc", type=int, required=True)
    record.add_argument("--seconds", type=float, required=True)
    record.add_argument("--budget", type=float, required=True)
    record.add_argument("--log", type=Path, required=True)
    record.set_defaults(func=cmd_record)
    summary = sub.add_parser("summary", help="summary.json, the tarball and the result JSONs into OUT_DIR")
    summary.add_argument("--work", type=Path, required=True)
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--mode", choices=["gpu", "dry-run"], default="gpu")
    summary.set_defaults(func=cmd_summary)
    plan = sub.add_parser("plan", help="the device calls: command, carried paths, bytes, time")
    plan.add_argument("--parts", type=Path, default=WHEEL_PARTS)
    plan.add_argument("--json", type=Path, help="also write the plan as JSON here")
    plan.set_defaults(func=cmd_plan)
    return parser.parse_args()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- env


def cmd_env(args: argparse.Namespace) -> None:
    import torch
    from common import device_slug

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "nvcc": (run(["nvcc", "--version"]) or "not found").splitlines()[-1],
        "commit": os.environ.get("ILM_DIST_COMMIT") or run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        }
    else:  # what the driver sees, for a node where torch sees no GPU
        info |= {"device": "cpu", "nvidia_smi": run(["nvidia-smi", "-L"]) or "failed or not found"}
    info["slug"] = device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    write_json(args.out, info)
    print(json.dumps(info, indent=2))
    if args.require_cuda and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        sys.exit(
            f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{visible!r}, nvidia-smi -L: {info['nvidia_smi']!r}): the check stops rather than run on the CPU"
        )


# --------------------------------------------------------------------------- extension and op tests


def cmd_extension(args: argparse.Namespace) -> None:
    """Whether ilm_dist._C loads and registers a CPU and a CUDA kernel for ``ilm_dist::bt_xcorr_loss``.

    A CUDA torch built without nvcc gives a CPU-only extension (setup.py warns): it loads, but the op has no
    CUDA kernel, and on a GPU ``bt_xcorr_loss`` falls back to the reference. Exit 77 (skipped) when the
    extension is not built; with ``--require-cuda`` (after the build on the node) 1 then, and without a
    CUDA kernel.
    """
    import torch

    from ilm_dist.ops import _extension

    result = {"load_error": _extension.LOAD_ERROR, "kernels": op_kernels()}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if result["load_error"]:
        sys.exit(f"ilm_dist._C does not load: {result['load_error']}" if args.require_cuda else 77)
    if args.require_cuda and not result["kernels"]["CUDA"]:
        sys.exit(
            f"ilm_dist._C has no CUDA kernel for {OP} (torch {torch.__version__}, CUDA {torch.version.cuda}): "
            "built without nvcc? See the build log's WARNING"
        )


OP = "ilm_dist::bt_xcorr_loss"
OP_TESTS = ["tests/ops/test_xcorr_op.py", "-q", "-ra", "-p", "no:cacheprovider"]


def op_kernels() -> dict[str, bool]:
    """Per dispatch key, whether ``OP`` has a kernel registered (False for all when it is not registered)."""
    import torch

    registered = torch._C._dispatch_has_kernel(OP)
    return {
        key: registered and torch._C._dispatch_has_kernel_for_dispatch_key(OP, key) for key in ("CPU", "CUDA")
    }


def cmd_op_tests(args: argparse.Namespace) -> None:
    """tests/ops/test_xcorr_op.py in two pytest runs, the CUDA tests first, so that the stage's time cap cuts
    the CPU tests, not the CUDA ones; ``--out`` holds each run's counts as soon as it ends."""
    runs = {"cuda": "cuda"} if args.cuda_only else {"cuda": "cuda", "rest": "not cuda"}
    result: dict[str, dict] = {}
    failed = False
    for name, expression in runs.items():
        xml = args.out.with_name(f"op_tests_{name}.xml")
        cmd = [*OP_TESTS, "-k", expression, "--junitxml", str(xml)]
        proc = subprocess.run([sys.executable, "-m", "pytest", *cmd], cwd=ROOT, check=False)
        result[name] = junit_summary(xml) if xml.is_file() else {"error": f"pytest exit {proc.returncode}"}
        failed |= proc.returncode != 0
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if failed:
        sys.exit("op tests failed: " + json.dumps({k: v.get("failed_tests", v) for k, v in result.items()}))


# --------------------------------------------------------------------------- wheels


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_manifest(parts: Path) -> dict | None:
    path = parts / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def part_status(parts: Path, manifest: dict) -> list[dict]:
    """Each part: present, size and checksum as the manifest says."""
    status = []
    for part in manifest["parts"]:
        path = parts / part["file"]
        entry = {"file": part["file"], "present": path.is_file()}
        if entry["present"]:
            entry["bytes_ok"] = path.stat().st_size == part["bytes"]
            entry["sha256_ok"] = entry["bytes_ok"] and sha256(path) == part["sha256"]
        status.append(entry)
    return status


def cmd_install_wheels(args: argparse.Namespace) -> None:
    """Reassemble the tar from its parts, verify it, unpack the wheels and pip-install them into --work/site.

    Exit status 77 (skipped) when no wheels were carried, 1 when parts are missing or corrupt. Writes
    ``--work/results/wheels.json`` either way: which parts arrived, what was installed, what imports.
    """
    manifest = load_manifest(args.parts)
    report_path = args.work / "results" / "wheels.json"
    if manifest is None:
        write_json(report_path, {"status": "no wheels carried", "parts_dir": str(args.parts)})
        print(f"no {args.parts / 'manifest.json'}: no wheels were carried (make gpu-wheels)")
        sys.exit(77)
    parts = part_status(args.parts, manifest)
    report = {"parts": parts, "tar_sha256": manifest["tar"]["sha256"]}
    missing = [p["file"] for p in parts if not (p["present"] and p["sha256_ok"])]
    if missing:
        write_json(report_path, report | {"status": f"parts missing or corrupt: {missing}"})
        sys.exit(
            f"wheel parts missing or corrupt: {missing} (each command carries one; see bench/gpu_check.py plan)"
        )
    unpacked = args.work / "wheels"
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir(parents=True)
    digest = hashlib.sha256()
    tar_path = args.work / "gpu-wheels.tar"
    with tar_path.open("wb") as tar_file:
        for part in manifest["parts"]:
            data = (args.parts / part["file"]).read_bytes()
            digest.update(data)
            tar_file.write(data)
    if digest.hexdigest() != manifest["tar"]["sha256"]:
        write_json(report_path, report | {"status": "reassembled tar has the wrong checksum"})
        sys.exit("reassembled gpu-wheels.tar does not match the manifest's checksum")
    with tarfile.open(tar_path) as tar:
        tar.extractall(unpacked, filter="data")
    tar_path.unlink()
    wheels = sorted(str(p) for p in unpacked.glob("*.whl"))
    expected = sorted(w["file"] for w in manifest["wheels"])
    if [Path(w).name for w in wheels] != expected:
        sys.exit(f"the tar holds {[Path(w).name for w in wheels]}, the manifest lists {expected}")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    if args.verify_only:  # the tags must suit the node's interpreter, whatever runs this
        pip += [
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            manifest["python"],
        ]
        pip += ["--implementation", "cp", *(a for p in manifest["platforms"] for a in ("--platform", p))]
        pip += ["--target", str(args.work / "site-dry-run")]
    else:
        pip += ["--target", str(args.work / "site")]
    start = time.perf_counter()
    subprocess.run([*pip, *wheels], check=True)
    if not args.verify_only:
        join_nvidia_namespace(args.work / "site")
    report |= {"status": "verified" if args.verify_only else "installed", "wheels": expected}
    report["install_s"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(unpacked)
    if not args.verify_only:
        env = {**os.environ, "PYTHONPATH": f"{args.work / 'site'}:{os.environ.get('PYTHONPATH', '')}"}
        probe = "import deepspeed, webdataset, pydantic, hjson, nvidia.dali as d; print(deepspeed.__version__, d.__version__)"
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
        report["imports"] = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()[-1500:]
        report["imports_ok"] = proc.returncode == 0
    write_json(report_path, report)
    print(json.dumps(report, indent=2))
    if not report.get("imports_ok", True):
        sys.exit("installed wheels do not import: " + report["imports"])


def join_nvidia_namespace(site: Path) -> None:
    """Make ``site/nvidia`` and the node's own ``nvidia/`` (its CUDA library wheels) one package.

    nvImageCodec's wheel ships ``nvidia/__init__.py``, which makes ``site/nvidia`` (first on PYTHONPATH) a
    regular package that would hide ``nvidia.cudnn`` & co.; where the node's ``nvidia/`` is the regular one,
    it would hide ``nvidia.dali``. ``pkgutil.extend_path`` joins every ``nvidia/`` folder on sys.path.
    """
    init = site / "nvidia" / "__init__.py"
    if init.parent.is_dir():
        init.write_text('__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n')


# --------------------------------------------------------------------------- NCCL


def cmd_nccl(args: argparse.Namespace) -> None:
    """One rank through ilm_dist's process-group start-up (``--backend auto``: NCCL on CUDA; ``nccl`` fails
    without CUDA instead of falling back to gloo)."""
    import torch
    import torch.distributed as dist

    from ilm_dist import distributed as D

    start = time.perf_counter()
    info, device = D.init_process_group(args.backend)
    init_s = time.perf_counter() - start
    backend = dist.get_backend()
    x = torch.arange(4, dtype=torch.float32, device=device) + info.rank
    dist.all_reduce(x)
    gathered = D.all_gather_no_grad(x[None])
    D.barrier()
    result = {
        "backend": backend,
        "device": str(device),
        "world_size": info.world_size,
        "init_s": round(init_s, 3),
        "all_reduce": x.tolist(),
        "all_gather_shape": list(gathered.shape),
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    }
    dist.destroy_process_group()
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    if backend != expected or result["all_reduce"] != [0.0, 1.0, 2.0, 3.0]:
        sys.exit(
            f"expected backend {expected} and all_reduce [0, 1, 2, 3], got {backend} {result['all_reduce']}"
        )


# --------------------------------------------------------------------------- records and summary


def status_of(rc: int) -> str:
    return {0: "passed", 77: "skipped", 124: "timeout", 137: "timeout"}.get(rc, "failed")


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    return text[-chars:]


def cmd_record(args: argparse.Namespace) -> None:
    record = {
        "name": args.name,
        "status": status_of(args.rc),
        "rc": args.rc,
        "seconds": round(args.seconds, 1),
        "budget_s": args.budget,
        "commit": os.environ.get("ILM_DIST_COMMIT"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "log_tail": log_tail(args.log),
    }
    write_json(args.work / "stages" / f"{args.name}.json", record)
    print(f"[gpu_check] {args.name}: {record['status']} in {record['seconds']} s (budget {args.budget:g} s)")


def stage_result(work: Path, name: str) -> dict | str | None:
    result = STAGES[name][1]
    path = work / "results" / result if result else None
    if path is None or not path.is_file():
        return None
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return junit_summary(path)


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests of a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failures = [
        f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}"
        for case in suite.iter("testcase")
        for bad in list(case.findall("failure")) + list(case.findall("error"))
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return counts | {"failed_tests": failures}


def cmd_summary(args: argparse.Namespace) -> None:
    work, out = args.work, args.out
    env = stage_result(work, "env") or {}
    slug = env.get("slug", "unknown")
    stages = []
    for name in STAGES:
        path = work / "stages" / f"{name}.json"
        record = json.loads(path.read_text()) if path.is_file() else {"name": name, "status": "not run"}
        record["result"] = stage_result(work, name)
        stages.append(record)
    summary = {
        "check": "bench/gpu_check.sh",
        "mode": args.mode,
        "commit": os.environ.get("ILM_DIST_COMMIT") or env.get("commit"),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": env,
        "stages": stages,
        "statuses": {s["name"]: s["status"] for s in stages},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    for name, prefix in RESULT_PREFIX.items():
        source = work / "results" / STAGES[name][1]
        if source.is_file():
            shutil.copyfile(source, out / f"{prefix}_{slug}.json")
    with tarfile.open(out / "gpu_check.tar.gz", "w:gz") as tar:
        for folder in ("stages", "logs", "results"):
            if (work / folder).is_dir():
                tar.add(work / folder, arcname=folder)
    written = sorted(p.name for p in out.iterdir())
    width = max(len(n) for n in STAGES)
    for s in stages:
        print(f"[gpu_check] {s['name']:<{width}}  {s['status']:<8} {s.get('seconds', '')}")
    print(f"[gpu_check] wrote {', '.join(written)} to {out}")
    if len(written) > OUT_FILES:
        sys.exit(f"{out} holds {len(written)} files; only {OUT_FILES} come back from the GPU node")
    broken = [s["name"] for s in stages if s["status"] in ("failed", "timeout")]
    if broken:
        sys.exit(f"stages failed: {', '.join(broken)} (their logs: summary.json, gpu_check.tar.gz)")


# --------------------------------------------------------------------------- plan


def repository_bytes() -> int:
    """Bytes of what travels without being carried: tracked and untracked, not ignored, files."""
    listed = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    if listed is None:
        return sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts)
    return sum(
        (ROOT / name).stat().st_size for name in listed.split("\0") if name and (ROOT / name).is_file()
    )


def device_calls(parts: Path) -> list[dict]:
    """The commands to send, one wheel part each, the last one running every stage not yet passed."""
    commit = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or "unknown"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if dirty:
        commit += "+uncommitted"
    manifest = load_manifest(parts)
    part_files = [p["file"] for p in manifest["parts"]] if manifest else []
    repo = repository_bytes()
    count = max(len(part_files), 1)
    calls = []
    for index in range(count):
        # calls before the last carry a part each and run stages that need no wheels
        stages = (
            None
            if index == count - 1
            else list(EARLY_STAGES[index] if index < len(EARLY_STAGES) else ["env"])
        )
        carry = [
            f".whl/parts/{name}" for name in (["manifest.json", part_files[index]] if part_files else [])
        ]
        carried = sum((ROOT / c).stat().st_size for c in carry)
        stage_arg = f"--stages {','.join(stages)} " if stages else ""
        budget = sum(STAGES[s][0] for s in stages) if stages else TOTAL_S
        command = f"ILM_DIST_COMMIT={commit} bash bench/gpu_check.sh {stage_arg}$OUT"
        calls.append(
            {
                "call": index + 1,
                "command": command,
                "carry": carry,
                "bytes": repo + carried,
                "stages": stages or "every stage not yet passed on the node",
                "timeout_s": min(600, budget + 60),
            }
        )
    return calls


def plan_problems(calls: list[dict]) -> list[str]:
    problems = []
    for call in calls:
        if len(call["command"]) > CALL_CHARS:
            problems.append(f"call {call['call']}: command longer than {CALL_CHARS} characters")
        if len(call["carry"]) > CALL_CARRY:
            problems.append(f"call {call['call']}: more than {CALL_CARRY} carried paths")
        if call["bytes"] > CALL_BYTES:
            problems.append(f"call {call['call']}: {call['bytes'] / MIB:.1f} MiB travel, more than 64 MiB")
    return problems


def cmd_plan(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.parts)
    if manifest is None:
        print(
            "no wheels built (make gpu-wheels): one call, which cannot run the stages that need deepspeed, "
        )
        print("webdataset or DALI (nccl, throughput, data, data_pipeline, bn_stats fail there)")
    else:
        status = part_status(args.parts, manifest)
        bad = [p["file"] for p in status if not (p["present"] and p["sha256_ok"])]
        wheels_mib = manifest["tar"]["bytes"] / MIB
        print(
            f"wheels: {len(manifest['wheels'])} in {wheels_mib:.1f} MiB, {len(status)} parts, checksums ok: {not bad}"
        )
        if bad:
            sys.exit(f"wheel parts missing or corrupt: {bad}; run make gpu-wheels again")
    calls = device_calls(args.parts)
    print(
        "device calls, back to back (the parts stay on the node only while calls follow each other closely;"
        " give the machine back after the last):"
    )
    for call in calls:
        print(f"  call {call['call']}: timeout_s={call['timeout_s']}, {call['bytes'] / MIB:.1f} MiB travel")
        print(f"    command: {call['command']}")
        print(f"    carry:   {json.dumps(call['carry'])}")
    problems = plan_problems(calls)
    if args.json:
        write_json(args.json, {"calls": calls, "problems": problems})
    if problems:
        sys.exit("plan does not fit the GPU node's limits: " + "; ".join(problems))


if __name__ == "__main__":
    main()

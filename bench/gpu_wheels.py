"""``make gpu-wheels``: the wheels a GPU node without a package registry lacks, in parts that travel one by one.

The GPU node this project is checked on has Python 3.12 (manylinux x86-64) with its own torch 2.11 + CUDA 13,
torchvision, numpy, pyyaml, pytest and more (NODE_HAS), but no deepspeed, webdataset, pydantic, hjson or
DALI, and nothing can be installed from a registry there. This script, run where pip reaches PyPI:

1. downloads the pinned binary or pure-Python wheels of WHEELS for CPython 3.12 manylinux x86-64, and builds
   deepspeed's (PyPI has only its sdist) as a pure-Python wheel with ``DS_BUILD_OPS=0``;
2. checks the closure: every ``Requires-Dist`` of every wheel (markers evaluated for CPython 3.12 on
   Linux x86-64, requested extras followed) is a carried wheel whose version satisfies it, something the
   node has (NODE_HAS), or a documented omission (NOT_CARRIED);
3. writes one uncompressed tar of all wheels (sorted, mtime 0) split into parts of at most PART_MIB MiB,
   and ``manifest.json`` with the SHA-256 of the tar, of every part and of every wheel.

Layout under ``.whl/`` (ignored by git): ``wheels/*.whl`` and ``parts/{manifest.json, gpu-wheels.tar.NN}``.
Each command sent to the GPU node carries one part (the whole tree it sends is limited to 64 MiB); the
parts stay on the node between commands that follow each other closely, and ``bench/gpu_check.sh``
reassembles, verifies and installs them into a private ``--target`` directory (``gpu_check.py
install-wheels``). ``python bench/gpu_check.py plan`` prints the commands.

Usage::

    python bench/gpu_wheels.py [--out .whl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MIB = 2**20
PART_MIB = 58  # < 60 MiB, so that a part, the manifest and the repository (~1 MiB) fit in 64 MiB
TAR_NAME = "gpu-wheels.tar"
BUILT_FROM_SDIST = {"deepspeed"}  # PyPI publishes only an sdist; built here with DS_BUILD_OPS=0

# What the node lacks, pinned to the versions this repository is tested with.
WHEELS = {
    "deepspeed": "0.19.8",
    "hjson": "3.1.0",  # deepspeed
    "pydantic": "2.13.4",  # deepspeed
    "pydantic-core": "2.46.4",  # pydantic (binary)
    "annotated-types": "0.7.0",  # pydantic
    "typing-inspection": "0.4.2",  # pydantic
    "webdataset": "1.0.2",
    "braceexpand": "0.1.7",  # webdataset
    "nvidia-dali-cuda130": "2.4.0",
    "astunparse": "1.6.3",  # DALI
    "gast": "0.7.0",  # DALI
    "libcst": "1.9.0",  # DALI
    "makefun": "1.16.0",  # DALI
    "nvtx": "0.2.17",  # DALI
    "optree": "0.20.0",  # DALI
    "nvidia-nvimgcodec-cu13": "0.9.0.20",  # DALI's image decoders
    "nvidia-nvjpeg": "13.3.2.43",  # nvImageCodec's GPU JPEG decoder (its extra "nvjpeg")
}
# The node's packages that the wheels above require.
NODE_HAS = {
    "einops",
    "msgpack",
    "ninja",
    "numpy",
    "nvidia-ml-py",
    "packaging",
    "psutil",
    "py-cpuinfo",
    "pyyaml",
    "six",
    "torch",
    "tqdm",
    "typing-extensions",
    "wheel",
}
# Declared requirements that are deliberately not carried (each costs a command's worth of transfer).
NOT_CARRIED = {
    "nvidia-libnvcomp-cu13": "DALI's and nvTIFF's compression codecs (27 MiB); DALI's image decoding never "
    "loads libnvcomp (LD_DEBUG=libs on a DALI pipeline run)",
    "nvidia-nvjpeg2k-cu13": "JPEG 2000 decoding; the packed shards hold JPEG only",
    "nvidia-nvtiff-cu13": "TIFF decoding; the packed shards hold JPEG only",
}
# Marker environment of the node's interpreter.
MARKER_ENV = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl", help="output folder (default: .whl)")
    return parser.parse_args()


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def download(names: dict[str, str], dest: Path) -> None:
    """Binary or pure-Python wheels for the node's interpreter and platform, without their dependencies."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    specs = [f"{name}=={version}" for name, version in names.items()]
    pip(
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(dest),
        *specs,
    )


def build_pure_python(name: str, version: str, dest: Path) -> None:
    """A wheel built here from the sdist, with no compiled ops (DeepSpeed JIT-builds any op it needs)."""
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(dest),
        f"{name}=={version}",
        env=env,
    )


def wheel_metadata(path: Path) -> dict:
    """Name, version and Requires-Dist of a wheel (its METADATA) and its tag from the file name."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    return {
        "name": canonicalize_name(meta["Name"]),
        "version": meta["Version"],
        "requires": meta.get_all("Requires-Dist") or [],
        "tag": "-".join(path.stem.split("-")[-3:]),
    }


def requirements(meta: dict, extras: set[str]) -> list[Requirement]:
    """The wheel's requirements that apply on the node, with ``extras`` requested."""
    reqs = [Requirement(line) for line in meta["requires"]]
    return [
        req
        for req in reqs
        if req.marker is None or any(req.marker.evaluate(MARKER_ENV | {"extra": e}) for e in extras or {""})
    ]


def closure_errors(metas: dict[str, dict]) -> list[str]:
    """Requirements of the carried wheels that neither a carried wheel, the node nor NOT_CARRIED satisfies."""
    errors, pending, seen = [], [(name, frozenset()) for name in metas], set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for req in requirements(metas[name], set(extras)):
            dep = canonicalize_name(req.name)
            if dep in NODE_HAS or dep in NOT_CARRIED:
                continue
            if dep not in metas:
                errors.append(f"{name} requires {req}, which is neither carried nor on the node")
            elif not req.specifier.contains(metas[dep]["version"], prereleases=True):
                errors.append(f"{name} requires {req}, but {dep} {metas[dep]['version']} is carried")
            else:
                pending.append((dep, frozenset(req.extras)))
    return errors


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_tar(wheels: list[Path], tar_path: Path) -> None:
    """An uncompressed tar of the wheels (already zip-compressed), byte-identical for the same wheels."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in sorted(wheels):
            info = tar.gettarinfo(str(wheel), arcname=wheel.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with wheel.open("rb") as f:
                tar.addfile(info, f)


def split(tar_path: Path, parts_dir: Path) -> list[dict]:
    """Equal parts of at most PART_MIB MiB: ``gpu-wheels.tar.00``, ``.01``, ..."""
    size = tar_path.stat().st_size
    count = -(-size // (PART_MIB * MIB))
    part_size = -(-size // count)
    parts = []
    with tar_path.open("rb") as src:
        for index in range(count):
            part = parts_dir / f"{TAR_NAME}.{index:02d}"
            part.write_bytes(src.read(part_size))
            parts.append({"file": part.name, "bytes": part.stat().st_size, "sha256": sha256(part)})
    return parts


def main() -> None:
    args = parse_args()
    wheels_dir, parts_dir = args.out / "wheels", args.out / "parts"
    for folder in (wheels_dir, parts_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
    download({n: v for n, v in WHEELS.items() if n not in BUILT_FROM_SDIST}, wheels_dir)
    for name in BUILT_FROM_SDIST:
        build_pure_python(name, WHEELS[name], wheels_dir)
    paths = sorted(wheels_dir.glob("*.whl"))
    metas = {meta["name"]: meta | {"path": path} for path in paths for meta in [wheel_metadata(path)]}
    if set(metas) != set(WHEELS):
        sys.exit(f"gpu-wheels: expected wheels for {sorted(WHEELS)}, got {sorted(metas)}")
    for name in BUILT_FROM_SDIST:
        if metas[name]["tag"] != "py3-none-any":
            sys.exit(
                f"gpu-wheels: {name} built as {metas[name]['tag']}, expected a pure-Python py3-none-any wheel"
            )
    errors = closure_errors(metas)
    if errors:
        sys.exit("gpu-wheels: incomplete dependency closure:\n  " + "\n  ".join(errors))
    tar_path = args.out / TAR_NAME
    write_tar(paths, tar_path)
    manifest = {
        "python": PYTHON_VERSION,
        "platforms": list(PLATFORMS),
        "tar": {"file": TAR_NAME, "bytes": tar_path.stat().st_size, "sha256": sha256(tar_path)},
        "parts": split(tar_path, parts_dir),
        "wheels": [
            {"file": m["path"].name, "name": n, "version": m["version"], "bytes": m["path"].stat().st_size}
            for n, m in sorted(metas.items())
        ],
        "not_carried": NOT_CARRIED,
    }
    tar_path.unlink()
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = manifest["tar"]["bytes"] / MIB
    print(f"{len(paths)} wheels, {total:.1f} MiB in {len(manifest['parts'])} parts under {parts_dir}")
    for part in manifest["parts"]:
        print(f"  {part['file']}  {part['bytes'] / MIB:.1f} MiB")


if __name__ == "__main__":
    main()

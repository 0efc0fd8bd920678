"""Build and install ilm_dist.

Installed by the Makefile into ``.venv`` with ``pip install --no-build-isolation -e .`` after
torch/torchvision are present, so the C++/CUDA extension in ``csrc/`` (when it exists) builds
against the torch that will run it (see the extension section below for the CUDA/CPU choice and
``ILM_DIST_NO_CUDA=1``).
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Unpinned on purpose: torchvision pulls the torch build it matches; a machine that already
    # has both (a GPU node's image) keeps them.
    "torch",
    "torchvision",
    "deepspeed",
    "webdataset",
    "numpy",
    "scipy",
    "pyyaml",
    "tqdm",
    "tensorboard",
    "scikit-learn",
    "matplotlib",
    "pillow",
]

EXTRAS_REQUIRE = {
    "dali": ["nvidia-dali-cuda130"],
    "tune": ["ray[tune]", "pandas"],
    "dicom": ["pydicom"],  # .dcm input to data_tools.pack
    "dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff"],
}
# The commands of an installed package (no source checkout needed); launch/*.py are the same commands.
CONSOLE_SCRIPTS = [
    "ilm-pretrain = ilm_dist.pretrain:pretrain_main",
    "ilm-dry-run = ilm_dist.plan:dry_run_main",
    "ilm-finetune = ilm_dist.eval.commands:finetune_main",
    "ilm-probe = ilm_dist.eval.commands:probe_main",
    "ilm-analyse = ilm_dist.eval.commands:analyse_main",
    "ilm-knn-check = ilm_dist.eval.knn_check:main",
    "ilm-tune = ilm_dist.tune.command:tune_main",
    "ilm-experiment = ilm_dist.experiment.command:experiment_main",
    "ilm-pack = data_tools.pack:main",
    "ilm-verify = data_tools.verify:main",
    "ilm-synthetic = data_tools.synthetic_dataset:main",
]
EXTRAS_REQUIRE["all"] = sorted({dep for deps in EXTRAS_REQUIRE.values() for dep in deps})

# --- C++/CUDA extension ilm_dist._C (csrc/) ---------------------------------------------------------
# A CUDAExtension when torch is a CUDA build and a CUDA toolkit (nvcc) is found, else a CppExtension
# (with a warning on stderr when torch is a CUDA build: _cuda_choice).
# ILM_DIST_NO_CUDA=1 forces the CPU-only build. GPU code is compiled for sm_80 and sm_90 plus
# compute_90 PTX (JIT-compiled on newer GPUs); set TORCH_CUDA_ARCH_LIST to build for other archs.
# MAX_JOBS bounds the parallel compile jobs (ninja).
MIN_NVCC = (11, 8)  # first release with sm_90
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
CSRC = Path("csrc")
DEFAULT_CUDA_ROOT = Path("/usr/local/cuda")


def _cuda_home(env: Mapping[str, str]) -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the toolkit of ``nvcc`` on PATH or /usr/local/cuda.

    ``nvcc`` may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), so a candidate must
    hold both bin/nvcc and include/cuda_runtime_api.h. (``torch.utils.cpp_extension.CUDA_HOME`` takes the
    parent of ``nvcc``'s folder without that check: /usr/local on such a machine, where the headers are not.)
    """
    root = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if root:
        return root
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(DEFAULT_CUDA_ROOT)
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime_api.h").exists():
            return str(root)
    return None


def _cuda_choice(
    torch_version: str, torch_cuda: str | None, env: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """The CUDA toolkit to build with (None: CPU-only), and a warning when a CUDA torch gets a CPU-only build
    (which registers no CUDA kernel for ``ilm_dist::bt_xcorr_loss``: on a GPU the op's self-check fails and
    ``bt_xcorr_loss`` falls back to the PyTorch reference)."""
    if env.get("ILM_DIST_NO_CUDA") == "1" or torch_cuda is None:
        return None, None
    cuda_home = _cuda_home(env)
    if cuda_home is not None:
        return cuda_home, None
    return None, (
        f"WARNING: torch {torch_version} is a CUDA {torch_cuda} build, but no CUDA toolkit was found "
        f"($CUDA_HOME/$CUDA_PATH unset, no nvcc on PATH, no {DEFAULT_CUDA_ROOT}): building ilm_dist._C for "
        "the CPU only, so on a GPU bt_xcorr_loss falls back to the PyTorch reference. Install the toolkit or "
        "set CUDA_HOME for the CUDA kernels, or set ILM_DIST_NO_CUDA=1 to build CPU-only on purpose."
    )


def _check_nvcc(cuda_home: str) -> None:
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse the CUDA version from `{nvcc} --version`:\n{out}")
    version = (int(match[1]), int(match[2]))
    if version < MIN_NVCC:
        raise RuntimeError(
            f"nvcc {version[0]}.{version[1]} at {nvcc} is too old: ilm_dist's CUDA extension needs "
            f"CUDA >= {MIN_NVCC[0]}.{MIN_NVCC[1]} (sm_90). Point CUDA_HOME at a newer toolkit or set "
            "ILM_DIST_NO_CUDA=1 for a CPU-only build."
        )


def _extensions() -> tuple[list, dict]:
    """The ``ext_modules`` and ``cmdclass`` for ilm_dist._C."""
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(
            "ilm_dist builds a C++ extension against torch: install torch first, then "
            "`pip install --no-build-isolation -e .`"
        ) from err
    cuda_home, warning = _cuda_choice(torch.__version__, torch.version.cuda, os.environ)
    if warning:
        print(warning, file=sys.stderr)
    if cuda_home is not None:
        _check_nvcc(cuda_home)
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    # No FMA contraction: csrc/xcorr_cpu.cpp's AVX2 and SSE2 clones then round identically.
    cxx = ["-O3", "-ffp-contract=off"]
    if cuda_home is None:
        ext = CppExtension("ilm_dist._C", sources, extra_compile_args={"cxx": cxx})
    else:
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += CUDA_ARCH_FLAGS
        sources += sorted(str(p) for p in CSRC.glob("*.cu"))
        ext = CUDAExtension("ilm_dist._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # pip's setuptools backend runs this file as __main__ too; tests import it
    EXT_MODULES, CMDCLASS = _extensions()
    setup(
        name="ilm_dist",
        version="0.1.0",
        description="Distributed MoCo v2 + intermediate-layer losses for medical imaging (Kaku et al., NeurIPS 2021)",
        python_requires=">=3.10",
        packages=find_packages(include=["ilm_dist*", "data_tools*"]),
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        entry_points={"console_scripts": CONSOLE_SCRIPTS},
        ext_modules=EXT_MODULES,
        cmdclass=CMDCLASS,
    )

"""setup.py's build choice for ilm_dist._C: CUDA or CPU-only, and the warning when a CUDA torch gets CPU-only."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.launcher import REPO


@pytest.fixture
def setup_module() -> ModuleType:
    """setup.py as a module: its functions, without running setup()."""
    spec = importlib.util.spec_from_file_location("ilm_dist_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toolkit(root: Path) -> Path:
    """A fake CUDA toolkit: bin/nvcc and include/cuda_runtime_api.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def test_cuda_choice_by_environment(setup_module, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_module, "DEFAULT_CUDA_ROOT", tmp_path / "absent")
    choice = setup_module._cuda_choice
    bare = {"PATH": str(tmp_path / "empty")}
    cuda_home, warning = choice("2.11.0", "13.0", bare)
    assert (
        cuda_home is None and "WARNING" in warning and "CUDA 13.0 build" in warning and "CPU only" in warning
    )
    assert choice("2.11.0", "13.0", {**bare, "ILM_DIST_NO_CUDA": "1"}) == (None, None)  # CPU-only on purpose
    assert choice("2.11.0", None, bare) == (None, None)  # a CPU torch: nothing to warn about
    assert choice("2.11.0", "13.0", {**bare, "CUDA_HOME": "/opt/cuda"}) == ("/opt/cuda", None)
    found = toolkit(tmp_path / "cuda-13.0")
    assert choice("2.11.0", "13.0", {"PATH": str(found / "bin")}) == (str(found), None)


def test_a_cuda_torch_without_nvcc_builds_cpu_only_and_says_so(setup_module, tmp_path, monkeypatch, capsys):
    for name in ("CUDA_HOME", "CUDA_PATH", "ILM_DIST_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    monkeypatch.setattr(setup_module, "DEFAULT_CUDA_ROOT", tmp_path / "absent")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.chdir(REPO)
    (ext,), _ = setup_module._extensions()
    assert ext.sources and not any(source.endswith(".cu") for source in ext.sources)
    err = capsys.readouterr().err
    assert "WARNING: torch" in err and "no CUDA toolkit was found" in err and "ILM_DIST_NO_CUDA=1" in err

"""No silent CPU fallback where CUDA was asked for, and train.deterministic's cuBLAS setting on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from ilm_dist import distributed as D
from ilm_dist.config import RunConfig, TrainConfig
from ilm_dist.errors import InputError
from ilm_dist.train import trainer as trainer_module

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")


class Stop(Exception):
    """Raised by a stand-in to end the Trainer's start-up early."""


def test_nccl_without_cuda_fails_before_any_process_group(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(
        InputError, match=r"engine.dist_backend=nccl needs CUDA, but torch .* sees no CUDA"
    ) as err:
        D.init_process_group("nccl")
    assert "CUDA_VISIBLE_DEVICES=''" in str(err.value) and "\n" not in str(err.value)
    assert not D.is_initialized()


def test_ds_accelerator_cuda_without_cuda_fails(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(InputError, match=r"DS_ACCELERATOR=cuda, but torch .* sees no CUDA device"):
        D.select_accelerator()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert D.select_accelerator() == "cpu"  # nothing asked for CUDA: a CPU run, as before
    assert os.environ["DS_ACCELERATOR"] == "cpu"


@pytest.fixture
def deterministic_off():
    yield
    torch.use_deterministic_algorithms(False)


def test_trainer_sets_the_cublas_workspace_before_anything_runs_on_cuda(monkeypatch, deterministic_off):
    """train.deterministic on CUDA: CUBLAS_WORKSPACE_CONFIG is set before the process group (and so
    before the first matmul), or cuBLAS matmuls raise in deterministic mode."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(D, "select_accelerator", lambda: "cuda")
    monkeypatch.setattr(trainer_module, "place_this_process", lambda *args, **kwargs: None)
    seen = {}

    def init_process_group(*args):
        seen["cublas"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        raise Stop

    monkeypatch.setattr(D, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        trainer_module.Trainer(RunConfig(train=TrainConfig(deterministic=True)))
    assert seen == {"cublas": ":4096:8", "deterministic": True}


def test_deterministic_keeps_a_deterministic_cublas_setting_and_refuses_others(
    monkeypatch, deterministic_off
):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    trainer_module.use_deterministic_algorithms(gpu=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(InputError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8"):
        trainer_module.use_deterministic_algorithms(gpu=True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    trainer_module.use_deterministic_algorithms(gpu=False)  # on CPU there is no cuBLAS to set up
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.are_deterministic_algorithms_enabled()

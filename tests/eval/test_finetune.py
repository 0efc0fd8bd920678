"""ilm_dist.eval.finetune: which weights each mode trains (the trained model compared tensor by tensor with
the seeded initial one), the batch-size check, and the saved result that a second call returns."""

import json

import pytest
import torch

from ilm_dist.eval import finetune as finetune_module
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.finetune import check_batch_size, finetune, frozen_head, result_dir
from ilm_dist.eval.settings import FinetuneSettings
from ilm_dist.model.encoder import build_resnet
from tests.eval.random_context import random_context

FRACTION = 0.06  # the paper's 6%: 8 of the 152 train images, one step of 8


@pytest.fixture(scope="module")
def ctx(packed_tiny, tmp_path_factory):
    return random_context(packed_tiny, tmp_path_factory.mktemp("evals"))


@pytest.fixture
def trained(monkeypatch):
    """The models ``fit`` trained, in call order (fit itself runs as usual)."""
    models = []
    real_fit = finetune_module.fit

    def spy(model, *args, **kwargs):
        models.append(model)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit", spy)
    return models


def settings(**changes) -> FinetuneSettings:
    quick = {"epochs": 1, "batch_size": 8, "evals": 1, "n_boot": 5, "train_aug": "none"}
    return FinetuneSettings(**(quick | changes))


def moved(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    """Names of the state_dict entries (parameters and buffers) that differ."""
    old, new = before.state_dict(), after.state_dict()
    return {name for name in old if not torch.equal(old[name], new[name])}


def backbone(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("fc.")}


def test_frozen_head_trains_fc_only():
    model = build_resnet("resnet18")
    head = frozen_head(model)
    assert head is model.fc and not model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    model = build_resnet("resnet18").train()
    assert frozen_head(model, "train") is model and model.training  # BatchNorm in train mode
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_linear_leaves_the_backbone_and_its_statistics_unchanged(ctx, trained):
    record = finetune(ctx, FRACTION, settings(mode="linear"))
    (model,) = trained
    changed = moved(ctx.classifier(), model)  # the classifier is seeded: the same initial weights
    assert backbone(changed) == set() and {"fc.weight", "fc.bias"} <= changed
    subset = record["subset"]["num_samples"]
    assert record["mode"] == "linear" and record["fraction"] == FRACTION and record["kind"] == "finetune"
    assert record["fit"]["steps"] == subset // 8 and record["test"]["num_samples"] == len(ctx.reader("test"))
    saved = result_dir(ctx, "linear", FRACTION)
    assert json.loads((saved / "metrics.json").read_text()) == json.loads(json.dumps(record))
    assert finetune(ctx, FRACTION, settings(mode="linear")) == json.loads(json.dumps(record))
    assert len(trained) == 1  # the saved result, not a second fit


def test_linear_with_train_mode_batchnorm_moves_its_statistics_only(ctx, trained):
    finetune(ctx, FRACTION, settings(mode="linear", frozen_bn="train"), force=True)
    changed = backbone(moved(ctx.classifier(), trained[0]))
    assert changed and all(
        n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in changed
    )


def test_full_trains_the_backbone_too(ctx, trained):
    finetune(ctx, FRACTION, settings(mode="full"))
    changed = backbone(moved(ctx.classifier(), trained[0]))
    # one step: the stem and every zero-initialised last BatchNorm of a residual branch (Goyal et al. 2017)
    assert {"conv1.weight", "layer1.0.bn2.weight", "layer4.1.bn2.weight"} <= changed


def test_the_global_batch_must_split_over_the_ranks(monkeypatch):
    check_batch_size(1)
    with pytest.raises(EvalError, match=r"^--batch-size 0 \(global\) does not split over 1 ranks; "):
        check_batch_size(0)
    monkeypatch.setattr(finetune_module, "world_size", lambda: 4)
    check_batch_size(8)
    with pytest.raises(EvalError) as err:
        check_batch_size(6)
    assert (
        str(err.value) == "--batch-size 6 (global) does not split over 4 ranks; use a positive multiple of 4"
    )

"""The pretraining validation loss (``val.*``) and the best-backbone export (``train.export=best``).

The loss is checked against the loss of the whole split in one batch (eval-mode BatchNorm makes every
sample independent of its batch), against itself on 2 ranks, and through real runs: the exported
backbone is the one of the logged argmin, and a resume keeps a best found before its checkpoint.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ilm_dist.config import ConfigError, load_config
from ilm_dist.data.augment import eval_transform
from ilm_dist.data.batch import Placement
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.data.torch_backend import SplitDataset, TwoViews
from ilm_dist.eval.weights import load_state, resolve_init
from ilm_dist.losses.contrastive import info_nce, moco_logits, top1_accuracy
from ilm_dist.serialization import load_tensors
from ilm_dist.train.preflight import preflight
from ilm_dist.train.validation import ValidationLoss
from tests.dist_scripts.validation_loss import fixed_models
from tests.eval.support import pack_dataset
from tests.launcher import REPO, read_metrics, run_deepspeed
from tests.test_config import plan_line

CPU = torch.device("cpu")
SMALL = ["data.image_size=32", "data.batch_size=8", "data.num_workers=0", "moco.queue_size=64"]
SMALL += ["loss.mse.pool_sizes=[4,2,2,1]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # val: 28 images = 3 batches of 8 (4 dropped), split 2 + 1 over two ranks
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 64, "val": 28, "test": 8}, num_classes=2)


def snapshot(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def config(data, *extra):
    return load_config(REPO / "configs/demo.yaml", [f"data.shards={data}", *SMALL, "val.every=1", *extra])


def validation_loss(cfg, rank: int = 0, world: int = 1) -> ValidationLoss:
    """The validator the trainer builds for ``rank`` of ``world`` on the CPU."""
    where = Placement(rank, world, CPU, cfg.seed, cfg.model.channels_last)
    return ValidationLoss(cfg.val, cfg.data, cfg.aug, where, load_manifest(cfg.data.shards))


def test_the_loss_is_the_whole_split_s_loss_and_nothing_changes(data):
    cfg = config(data, "val.views=eval")
    models = fixed_models(cfg, CPU)
    models.query.train()
    before = [snapshot(m) for m in (models.query, models.key_encoder)], models.queue.clone()
    got = validation_loss(cfg)(models, step=1)
    assert models.query.training and models.key_encoder.training  # modes restored
    for module, state in zip((models.query, models.key_encoder), before[0], strict=True):
        assert_same_tensors(snapshot(module), state)  # weights and BatchNorm statistics
    assert torch.equal(models.queue, before[1])

    # reference: the 24 validated images (3 whole batches) in one eval-mode forward, float64 loss
    reader = ShardReader(load_manifest(data), "val")
    images = SplitDataset(reader, TwoViews(eval_transform(cfg.aug, 32)), list(range(24)))
    view1 = torch.stack([images[i][0][0] for i in range(24)])
    query, key = models.query.eval(), models.key_encoder.eval()
    with torch.no_grad():
        out, keys = query.encoder(view1), query.key_features(key, view1)
        q = F.normalize(out.embedding, dim=1).double()
        logits = moco_logits(q, keys[0].double(), models.queue.double(), cfg.moco.temperature)
        mse = query.intermediate(query.intermediate.reduce(out.blocks), keys[1:])
    assert got["val_moco"] == pytest.approx(info_nce(logits).item(), rel=1e-5)
    assert got["val_moco_acc"] == pytest.approx(top1_accuracy(logits).item())
    for block, value in zip((1, 2, 3, 4), mse.tolist(), strict=True):
        assert got[f"val_mse_block{block}"] == pytest.approx(value, rel=1e-4)
    assert got["val_loss"] == pytest.approx(info_nce(logits).item() + mse.sum().item(), rel=1e-5)


def test_each_rank_validates_a_range_of_whole_batches(data):
    cfg = config(data)
    shards = [validation_loss(cfg, rank, world=2).loader.dataset.indices for rank in (0, 1)]
    assert shards == [list(range(8)), list(range(8, 24))]  # batch 1, batches 2-3; 4 images dropped


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_loss(data, tmp_path):
    """Barlow Twins (its statistics are the batch's) with global_batch, augmented views, a drawn subset."""
    extra = ["loss.type=bt", "loss.bt.proj_dims=[32,32]", "loss.bt.global_batch=true", "val.max_samples=27"]
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"val_{ranks}.json"
        run_deepspeed("tests/dist_scripts/validation_loss.py", [str(out), str(data), *SMALL, *extra], ranks)
        results[ranks] = json.loads(out.read_text())
    assert set(results[1]) == {"val_loss", "val_moco", "val_moco_acc"} | {
        f"val_bt_block{b}" for b in range(1, 5)
    }
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


# --------------------------------------------------------------------------- runs

RUN = [*SMALL, "val.every=1", "train.export=best", "train.max_steps=6", "train.ckpt_every=1"]
RUN += ["train.keep_checkpoints=10", "train.log_every=1"]


def pretrain(data, out, *extra):
    cmd = [sys.executable, "launch/pretrain.py", "--config", "configs/demo.yaml", f"data.shards={data}"]
    proc = subprocess.run(
        [*cmd, f"output_dir={out}", *RUN, *extra], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "best"
    pretrain(data, out)
    return out


def checkpoint_backbone(run, step):
    return load_state(resolve_init(str(run / "checkpoints" / f"step_{step}")))


def test_the_exported_backbone_is_the_logged_argmin_s(run):
    logged = {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["step"] == min(logged, key=logged.get)
    assert best["value"] == logged[best["step"]]
    assert best["step"] != 6, "pick a run whose best is not its last step"
    assert_same_tensors(load_tensors(run / "backbone.pt"), checkpoint_backbone(run, best["step"]))
    assert_same_tensors(load_tensors(run / "backbone_best.pt"), checkpoint_backbone(run, best["step"]))
    assert_same_tensors(load_tensors(run / "backbone_last.pt"), checkpoint_backbone(run, 6))
    assert json.loads((run / "final_state.json").read_text())["best"] == best


def test_a_resume_keeps_the_best_found_before_its_checkpoint(run, data, tmp_path):
    best = json.loads((run / "best.json").read_text())
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    after = best["step"] + 1  # resume after the best: the resumed steps cannot find it again
    (resumed / "checkpoints" / "latest").write_text(f"step_{after}")
    # files of a best found after that checkpoint, in steps the resumed run discards
    (resumed / "best.json").write_text(json.dumps({**best, "step": 6, "value": -1.0}))
    shutil.copy(run / "backbone_last.pt", resumed / "backbone_best.pt")
    for name in ("backbone.pt", "backbone_last.pt", "final_state.json"):
        (resumed / name).unlink()
    pretrain(data, resumed, "--resume")
    assert json.loads((resumed / "best.json").read_text()) == best
    assert_same_tensors(load_tensors(resumed / "backbone.pt"), load_tensors(run / "backbone.pt"))
    assert_same_tensors(load_tensors(resumed / "backbone_best.pt"), load_tensors(run / "backbone.pt"))
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "val_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- config and plan


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.export=best"], "train.export: 'best' selects by the validation loss: set val.every"),
        (["val.every=5", "data.backend=synthetic"], "val.every: the validation loss needs packed shards"),
        (["val.every=5", "val.split=train"], "val.split: must differ from data.split ('train')"),
        (["val.every=5", "val.max_samples=0"], "val.max_samples: must be >= 1"),
    ],
)
def test_impossible_validation_settings_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(REPO / "configs/demo.yaml", [f"data.shards={data}", *overrides])


def test_a_validation_split_smaller_than_a_batch_is_refused_before_the_run(data):
    with pytest.raises(ConfigError, match=r"val.split: split .val. .* gives 7 samples .* data.batch_size=8"):
        preflight(
            str(REPO / "configs/demo.yaml"),
            [f"data.shards={data}", *SMALL, "val.every=2", "val.max_samples=7"],
        )


def test_the_plan_line_says_what_is_validated_and_exported(data):
    line = plan_line(config(data, "val.every=50", "train.export=best"), 100, 1, 1)
    assert (
        "validation loss every 50 steps and at the last on all samples of split 'val' (augmented views)"
        in line
    )
    assert "backbone.pt: that best backbone (train.export=best), backbone_last.pt the last" in line
    assert "the last step's backbone (train.export=last)" in plan_line(
        config(data, "val.every=50"), 100, 1, 1
    )

"""End to end on a tiny packed set: pretrain (launch/pretrain.py), probe, fine-tune, analyse; plus the
frozen-backbone guarantees, the kNN monitor and the CLI's error exits."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ilm_dist.config import AugConfig, MonitorConfig
from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval import probe as probe_module
from ilm_dist.eval.commands import analyse_main, finetune_main, probe_main
from ilm_dist.eval.context import EvalTarget, init_test_features, open_context
from ilm_dist.eval.monitor import KnnMonitor
from ilm_dist.eval.probe import probe
from ilm_dist.eval.settings import ProbeSettings
from ilm_dist.eval.store import load_npz
from ilm_dist.eval.weights import fingerprint, load_state, resolve_init
from ilm_dist.folder_lock import FolderLock
from ilm_dist.model.encoder import Encoder
from tests.eval.support import pack_dataset

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
QUICK_FT = ["--epochs", "1", "--batch-size", "32", "--evals", "1", "--bootstrap", "20"]
QUICK_PROBE = ["--epochs", "3", "--evals", "2", "--bootstrap", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 64, "val": 16, "test": 24}, num_classes=2)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "moco"
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        "--config",
        "configs/demo.yaml",
        f"data.shards={data}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "moco.queue_size=64",
        "train.max_steps=2",
        "train.log_every=1",
        f"output_dir={out}",
        "name=moco",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory) -> Path:
    """Two methods (the pretrained run and random init), probed and fine-tuned at 25% and 100%."""
    ev = tmp_path_factory.mktemp("eval")
    cfg = ["--config", str(run / "config.yaml")]
    for weights in (["--weights", str(run)], ["--weights", "random", *cfg]):
        finetune_main([*weights, "--out", str(ev), "--fractions", "0.25", "1", *QUICK_FT])
        probe_main([*weights, "--out", str(ev), *QUICK_PROBE])
    return ev


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_has_the_expected_rows(evaluated, tmp_path):
    analyse_main(
        [str(evaluated), "--out", str(tmp_path / "report"), "--cka-subsets", "3", "--cka-subset-size", "16"]
    )
    report = tmp_path / "report"
    for name in ("finetune", "probe", "cka", "ks"):
        assert (report / f"{name}.png").stat().st_size > 1000
    ft = read_csv(report / "finetune.csv")
    assert {(r["method"], r["fraction"], r["metric"]) for r in ft} == {
        (m, f, metric)
        for m in ("moco", "random_init")
        for f in ("0.25", "1.0")
        for metric in ("auc", "accuracy", "f1", "macro_f1")
    }
    assert {r["labelled"] for r in ft if r["fraction"] == "0.25"} == {"16"}
    probe_rows = read_csv(report / "probe.csv")
    assert len(probe_rows) == 2 * 4 * 4
    assert {r["protocol"] for r in ft + probe_rows} == {"ilm_dist"}
    cka = read_csv(report / "cka.csv")
    assert len(cka) == 2 * 2 * 4 and all(0 <= float(r["linear"]) <= 1 + 1e-9 for r in cka)
    assert [(r["method"], r["class"]) for r in read_csv(report / "ks.csv")] == [
        ("moco", "1"),
        ("random_init", "1"),
    ]
    text = (report / "report.md").read_text()
    assert "| moco | " in text and "| random_init | " in text and "![CKA per block](cka.png)" in text
    assert "Block 4" in text and "KS (mean over classes)" in text
    assert "Every number below comes from the evaluation protocol `ilm_dist` (digest" in text
    assert "settings given over it: cka num_subsets=3, cka subset_size=16, finetune batch_size=32" in text


def test_saved_results_are_not_recomputed(evaluated, run):
    metrics = evaluated / "moco" / "finetune" / "full_f1" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    finetune_main(["--weights", str(run), "--out", str(evaluated), "--fractions", "1", *QUICK_FT])
    assert metrics.stat().st_mtime_ns == stamp


def test_probe_leaves_the_backbone_untouched(evaluated, run):
    record = json.loads((evaluated / "moco" / "probe" / "f1" / "metrics.json").read_text())
    ctx = open_context(EvalTarget(str(run), str(evaluated)), CPU)
    assert record["backbone_sha256"] == fingerprint(ctx.classifier())
    assert set(record["blocks"]) == {"block1", "block2", "block3", "block4"}


def test_deepspeed_checkpoint_holds_the_exported_backbone(run):
    exported = load_state(resolve_init(str(run)))
    from_checkpoint = load_state(resolve_init(str(run / "checkpoints")))
    assert set(exported) == set(from_checkpoint)
    assert all(torch.equal(exported[k], from_checkpoint[k]) for k in exported)


def test_probe_fails_loudly_if_the_backbone_moves(run, tmp_path, monkeypatch):
    original = probe_module.cached_features

    def drifting(ctx, backbone, *args):
        backbone.layer1[0].bn1.running_mean += 0.1  # what train-mode BN would do during extraction
        return original(ctx, backbone, *args)

    monkeypatch.setattr(probe_module, "cached_features", drifting)
    ctx = open_context(EvalTarget(str(run), str(tmp_path)), CPU)
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        probe(ctx, ProbeSettings(epochs=1, n_boot=0))


def test_linear_finetuning_keeps_the_backbone_features(run, tmp_path):
    finetune_main(
        ["--weights", str(run), "--out", str(tmp_path), "--fractions", "1", "--mode", "linear", *QUICK_FT]
    )
    after = load_npz(tmp_path / "moco" / "finetune" / "linear_f1" / "features_test.npz")
    before = init_test_features(open_context(EvalTarget(str(run), str(tmp_path)), CPU))
    for block in ("block1", "block4"):
        np.testing.assert_array_equal(after[block], before[block])


def test_a_result_being_computed_is_not_computed_twice(evaluated, run, capsys):
    """While one command holds a result folder (its lock), a second on the same result stops naming it and
    leaves the saved files as they are, even with --force."""
    (result,) = (evaluated / "moco" / "probe").iterdir()
    before = {p.name: p.read_bytes() for p in result.iterdir() if p.is_file()}
    lock = FolderLock(result, "probe of moco")
    try:
        with pytest.raises(SystemExit) as exit_info:
            probe_main(["--weights", str(run), "--out", str(evaluated), *QUICK_PROBE, "--force"])
    finally:
        lock.release()
    assert exit_info.value.code == 2
    assert f"error: {result} is in use by probe of moco pid {os.getpid()} on " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in result.iterdir() if p.is_file()} == before


def test_mismatched_runs_are_refused(evaluated, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(evaluated / "moco", other)
    source = json.loads((other / "source.json").read_text())
    (other / "source.json").write_text(json.dumps(source | {"name": "other"}))
    shutil.rmtree(other / "finetune" / "full_f0.25")
    with pytest.raises(SystemExit) as exit_info:
        analyse_main([str(evaluated / "moco"), str(other), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "mismatched fine-tuning (mode, fraction)" in capsys.readouterr().err
    (other / "source.json").write_text(json.dumps(source | {"name": "other", "dataset_id": "0" * 16}))
    with pytest.raises(SystemExit):
        analyse_main([str(evaluated / "moco"), str(other), "--out", str(tmp_path / "r")])
    assert "mismatched runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fractions", "0.01"], "label fraction 0.01 leaves class '0' empty"),
        (["model.arch=resnet34"], "backbone.pt: weights do not fit resnet34; the file looks like resnet18"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(run, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--weights", str(run), "--out", str(tmp_path), *QUICK_FT, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_random_weights_need_a_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        probe_main(["--weights", "random", "--out", str(tmp_path)])
    assert "pass --config" in capsys.readouterr().err


def test_knn_monitor_restores_mode_and_statistics(data):
    monitor = KnnMonitor(
        MonitorConfig(every=1, max_bank=40, max_val=12), load_manifest(data), CPU, AugConfig(), 32
    )
    backbone = Encoder("resnet18", 16, False).backbone.train()
    before = fingerprint(backbone)
    result = monitor.measure(backbone)
    assert set(result) == {f"knn_acc_block{i}" for i in range(1, 5)}
    assert all(0 <= v <= 1 for v in result.values()) and result["knn_acc_block1"] > 0.5
    assert backbone.training and fingerprint(backbone) == before


def test_knn_monitor_multilabel(tmp_path):
    data = pack_dataset(tmp_path, {"train": 30, "val": 12, "test": 4}, num_classes=3, multilabel=True)
    monitor = KnnMonitor(MonitorConfig(k=5), load_manifest(data), CPU, AugConfig(), 32)
    result = monitor.measure(torchvision.models.resnet18())
    assert set(result) == {f"knn_auc_block{i}" for i in range(1, 5)}

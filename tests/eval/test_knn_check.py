"""`launch/knn_check.py`: per-block kNN accuracies of a run's backbone, computed as the run trained."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from ilm_dist.config import load_config, save_config
from ilm_dist.cpu_placement import cpu_has_amx
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.eval.features import eval_loader
from ilm_dist.eval.knn import knn_accuracy
from ilm_dist.eval.knn_check import main

REPO_CONFIG = "configs/demo.yaml"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    cmd = [
        sys.executable,
        "-m",
        "data_tools.synthetic_dataset",
        str(out),
        "--per-class",
        "20",
        "--size",
        "40",
    ]
    subprocess.run([*cmd, "--quiet", "--workers", "1"], check=True, capture_output=True)
    return out


def make_run(root, packed, *overrides: str):
    """A run folder as pretraining leaves it: config.yaml and a (seeded, untrained) backbone.pt."""
    root.mkdir()
    cfg = load_config(REPO_CONFIG, [f"data.shards={packed}", "data.image_size=32", *overrides])
    save_config(cfg, root / "config.yaml")
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(state, root / "backbone.pt")
    return cfg, state


def reference_blocks(state, cfg, split: str, dtype: torch.dtype) -> tuple[list[np.ndarray], np.ndarray]:
    """Pooled layer1..layer4 outputs by a hand-written torchvision forward under ``dtype`` autocast."""
    net = torchvision.models.resnet18()
    net.load_state_dict(state, strict=False)
    net.eval()
    loader = eval_loader(ShardReader(load_manifest(cfg.data.shards), split), cfg.aug, cfg.data.image_size)
    blocks, labels = [[] for _ in range(4)], []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for images, label in loader:
            x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
            for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
                x = layer(x)
                blocks[i].append(x.float().mean(dim=(2, 3)).numpy())
            labels.append(label.numpy())
    return [np.concatenate(b) for b in blocks], np.concatenate(labels).reshape(-1)


@pytest.mark.parametrize("cpu_autocast", ["none", "auto"])
def test_trained_column_is_the_knn_of_the_runs_forward(tmp_path, packed, cpu_autocast, capsys):
    cfg, state = make_run(tmp_path / "run", packed, f"engine.cpu_autocast={cpu_autocast}")
    main(["--run", str(tmp_path / "run"), "--split", "val"])
    result = json.loads((tmp_path / "run" / "knn_check.json").read_text())
    dtype = torch.bfloat16 if cpu_autocast == "auto" and cpu_has_amx() else torch.float32
    assert result["forward"] == f"{dtype}, channels-last"  # configs/demo.yaml: model.channels_last
    bank, bank_labels = reference_blocks(state, cfg, "train", dtype)
    val, val_labels = reference_blocks(state, cfg, "val", dtype)
    want = [knn_accuracy(b, bank_labels, v, val_labels) for b, v in zip(bank, val, strict=True)]
    # channels-last against NCHW: the same sums in another order, so a neighbour may swap at a tie
    np.testing.assert_allclose(result["trained"], want, atol=1.01 / len(val_labels))
    assert len(result["random_init"]) == 4
    assert f"forward: {dtype}, channels-last" in capsys.readouterr().out


def test_a_run_whose_deepspeed_config_is_gone_is_one_line(tmp_path, packed, capsys):
    (tmp_path / "gone.json").write_text("{}")
    make_run(tmp_path / "run", packed, f"engine.deepspeed_config={tmp_path / 'gone.json'}")
    (tmp_path / "gone.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.json" in err[0], err

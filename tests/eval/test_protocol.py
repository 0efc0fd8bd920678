"""Evaluation protocols (``--protocol``): files checked by key, datasets chosen by task or name, flags over the
protocol's values, and ``--protocol official`` end to end on a tiny packed set: what every result records,
what the commands then do (validation every epoch, train-mode BatchNorm, ToTensor inputs, the official
intervals) and the analysis refusing to mix protocols."""

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ilm_dist.config import AugConfig
from ilm_dist.data.manifest import load_manifest
from ilm_dist.eval.commands import analyse_main, finetune_main, probe_main
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import extract_block_features
from ilm_dist.eval.fit import validation_steps
from ilm_dist.eval.metrics import bootstrap_ci
from ilm_dist.eval.protocol import load_protocol
from ilm_dist.eval.settings import FinetuneSettings
from ilm_dist.eval.store import load_npz
from ilm_dist.eval.weights import build_classifier
from tests.eval.support import pack_dataset

CPU = torch.device("cpu")
OFFICIAL_IDC = ["--protocol", "official", "--dataset", "idc"]
QUICK = ["--epochs", "2", "--bootstrap", "40"]  # the rest is the protocol's (batch 16: 4 steps per epoch)


def write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- files and resolution


def test_the_official_protocol_resolves_per_dataset():
    official = load_protocol("official")
    nih = official.resolve("multilabel", None)  # the only multilabel dataset: no --dataset needed
    assert nih.dataset == "nih" and nih.inputs == "to_tensor"
    ft = nih.settings("finetune")
    assert (ft.epochs, ft.batch_size, ft.eval_each_epoch, ft.frozen_bn, ft.ci, ft.n_boot) == (
        100,
        16,
        True,
        "train",
        "official",
        500,
    )
    assert nih.settings("probe").batch_size == 16 and not nih.settings("probe").standardise
    idc = official.resolve("binary", "idc")
    assert (idc.settings("finetune").select, idc.settings("finetune").report) == ("accuracy", "macro_f1")
    assert idc.settings("probe").batch_size == 64
    assert official.resolve("ordinal", None).dataset == "dr_grades"
    assert idc.digest != official.resolve("binary", "dr").digest
    with pytest.raises(
        EvalError, match=r"idc \(binary\), dr \(binary\).*several fit a binary task: pass --dataset"
    ):
        official.resolve("binary", None)
    with pytest.raises(
        EvalError, match="--dataset nih: protocol official describes nih as a multilabel task"
    ):
        official.resolve("binary", "nih")
    with pytest.raises(EvalError, match=r"--dataset chest: protocol official .* has no such dataset"):
        official.resolve("multilabel", "chest")


def test_a_protocol_file_extends_a_base_and_flags_win(tmp_path):
    (tmp_path / "bases").mkdir()
    write(tmp_path / "bases" / "short.yaml", "finetune:\n  epochs: 3\n  batch_size: 8\ncka:\n  sigma: 0.5\n")
    child = write(tmp_path / "mine.yaml", "base: bases/short.yaml\nname: mine\nfinetune:\n  epochs: 5\n")
    protocol = load_protocol(str(child)).resolve("binary", None)
    assert protocol.name == "mine" and protocol.dataset is None
    assert (protocol.settings("finetune").epochs, protocol.settings("finetune").batch_size) == (5, 8)
    assert protocol.settings("finetune", {"epochs": 7}).epochs == 7  # a flag on the command line
    assert protocol.settings("cka").sigma == 0.5 and protocol.settings("probe") == load_protocol(
        "ilm_dist"
    ).resolve("binary", None).settings("probe")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("finetune:\n  epochs: 0\n", r"bad.yaml: --epochs 0: must be >= 1"),
        (
            "finetune:\n  epoch: 3\n",
            r"bad.yaml: unknown key 'finetune.epoch' \(did you mean 'finetune.epochs'\?\)",
        ),
        (
            "probe:\n  frozen_bn: sometimes\n",
            r"bad.yaml: probe.frozen_bn: 'sometimes' is not one of \['eval', 'train'\]",
        ),
        ("finetune:\n  aug:\n    rotation: 400\n", r"bad.yaml: aug.rotation: degrees in \[0, 180\]"),
        ("finetune:\n  aug:\n    flip: true\n", r"bad.yaml: unknown key 'finetune.aug.flip'"),
        ("inputs: imagenet\n", r"bad.yaml: inputs is 'imagenet', expected one of \('run', 'to_tensor'\)"),
        ("datasets:\n  x:\n    task: grades\n", r"bad.yaml: datasets.x.task must be one of"),
        ("evaluation: {}\n", r"bad.yaml: unknown key\(s\) \['evaluation'\]"),
    ],
)
def test_a_bad_protocol_file_names_the_file_and_key(tmp_path, text, message):
    with pytest.raises(EvalError, match=message):
        load_protocol(str(write(tmp_path / "bad.yaml", text)))


def test_an_unknown_protocol_name_lists_the_names():
    with pytest.raises(EvalError, match=r"--protocol papers: not a protocol name \(ilm_dist, official\)"):
        load_protocol("papers")


def test_validation_every_epoch_is_the_end_of_every_epoch():
    assert validation_steps(12, 4, evals=2, each_epoch=True) == {4, 8, 12}
    assert validation_steps(10, 4, evals=2, each_epoch=True) == {4, 8, 10}  # min_steps beyond whole epochs
    assert validation_steps(12, 4, evals=2, each_epoch=False) == {6, 12}


def test_official_intervals_are_the_bootstrap_mean_plus_minus_its_standard_error():
    rng = np.random.default_rng(0)
    labels = (rng.random((120, 3)) < 0.4).astype(int)
    probs = np.clip(0.3 * labels + rng.random((120, 3)) * 0.7, 0, 1)
    got = bootstrap_ci("multilabel", labels, probs, ("a", "b", "c"), n_boot=60, seed=5, style="official")
    # the official NIH code: one AUC per finding per resample, mean and std over all of them
    draws = np.random.default_rng(5).integers(0, 120, size=(60, 120))
    aucs = np.array([[roc_auc_score(labels[i, c], probs[i, c]) for c in range(3)] for i in draws])
    for name, values in (("macro_auc", aucs), ("auc/a", aucs[:, 0])):
        half = 1.96 * values.std() / np.sqrt(60)
        np.testing.assert_allclose(got[name], [values.mean() - half, values.mean() + half], err_msg=name)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 64, "val": 16, "test": 24}, num_classes=2)


def random_weights(data):
    return [
        "--weights",
        "random",
        "--config",
        "configs/demo.yaml",
        f"data.shards={data}",
        "data.image_size=32",
    ]


@pytest.fixture(scope="module")
def official(data, tmp_path_factory):
    """Random init evaluated under the official IDC protocol: full and linear fine-tuning, the live probe."""
    ev = tmp_path_factory.mktemp("eval")
    for mode in ("full", "linear"):
        finetune_main(
            [
                *random_weights(data),
                "--out",
                str(ev),
                *OFFICIAL_IDC,
                "--fractions",
                "1",
                "--mode",
                mode,
                *QUICK,
            ]
        )
    probe_main([*random_weights(data), "--out", str(ev), *OFFICIAL_IDC, *QUICK])
    return ev


def read(path):
    return json.loads(path.read_text())


def test_every_result_records_the_official_protocol_and_follows_it(official):
    method = official / "random_init"
    protocol = read(method / "protocol.json")
    resolved = load_protocol("official").resolve("binary", "idc")
    assert protocol == json.loads(json.dumps(resolved.record()))
    assert protocol["finetune"]["epochs"] == 100 and protocol["cka"]["absolute_sigma"] is True
    full = read(method / "finetune/full_f1/metrics.json")
    assert full["protocol"] == resolved.summary()
    assert full["settings"]["epochs"] == 2  # the flag over the protocol's 100
    assert full["settings"]["aug"]["crop_scale"] == [0.2, 1.0] and full["settings"]["aug"]["rotation"] == 30
    assert (full["primary"], full["selected_by"], full["ci_style"]) == ("macro_f1", "accuracy", "official")
    assert [h["step"] for h in full["fit"]["history"]] == [4, 8]  # validated after each of the 2 epochs
    probe = read(method / "probe/f1/metrics.json")
    assert probe["protocol"] == resolved.summary()
    assert (probe["settings"]["frozen_bn"], probe["settings"]["standardise"]) == ("train", False)
    for block in probe["blocks"].values():
        # the official IDC probing batch of 64: one step per epoch on the 64 training images
        assert [h["step"] for h in block["fit"]["history"]] == [1, 2] and block["primary"] == "macro_f1"
    assert not list((method / "probe/f1").glob("features_*.npz"))  # the live path caches nothing


def test_inputs_are_not_normalised_under_the_official_protocol(official, data):
    saved = load_npz(official / "random_init/init_features_test.npz")
    torch.manual_seed(0)  # the context seeds the random init with the run config's seed
    model = build_classifier("resnet18", None, 2, "random").eval()
    unit = AugConfig(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    want = extract_block_features(model, load_manifest(data), "test", unit, 32, CPU)
    for i in (1, 4):
        np.testing.assert_allclose(saved[f"block{i}"], want.blocks[i - 1], rtol=1e-5, atol=1e-6)


def test_linear_fine_tuning_under_official_moves_only_the_batchnorm_statistics(official):
    """``--only-ll``: the frozen backbone in train mode, so the test features after training differ."""
    before = load_npz(official / "random_init/init_features_test.npz")
    after = load_npz(official / "random_init/finetune/linear_f1/features_test.npz")
    assert not np.allclose(before["block1"], after["block1"])


def test_the_report_names_the_protocol_and_analyse_refuses_another(official, tmp_path, capsys):
    analyse_main(
        [str(official), "--out", str(tmp_path / "report"), "--cka-subsets", "2", "--cka-subset-size", "12"]
    )
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Every number below comes from the evaluation protocol `official`, dataset `idc`" in text
    assert "the official style, bootstrap mean ± 1.96·std/√40" in text and "best on val by accuracy" in text
    assert "(test macro_f1, 95% bootstrap CI)" in text
    cka = read(official / "random_init/finetune/full_f1/cka.json")
    assert cka["params"]["absolute_sigma"] is True and cka["params"]["sigma"] == 0.8
    with pytest.raises(SystemExit) as exit_info:
        analyse_main([str(official), "--out", str(tmp_path / "r2"), "--protocol", "ilm_dist"])
    assert exit_info.value.code == 2
    assert (
        "--protocol ilm_dist: the methods were evaluated under protocol official" in capsys.readouterr().err
    )


def test_a_method_directory_keeps_one_protocol_and_methods_of_two_are_not_compared(
    official, data, tmp_path, capsys
):
    ev = tmp_path / "ev"
    shutil.copytree(official, ev)
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([*random_weights(data), "--out", str(ev), "--fractions", "1", *QUICK])
    assert exit_info.value.code == 2
    assert "was evaluated under protocol official (dataset idc" in capsys.readouterr().err
    finetune_main([*random_weights(data), "--out", str(ev), "--name", "other", "--fractions", "1", *QUICK])
    with pytest.raises(SystemExit):
        analyse_main([str(ev), "--out", str(tmp_path / "report")])
    assert "mismatched protocols" in capsys.readouterr().err


def test_a_metric_the_task_lacks_is_refused_before_training(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([*random_weights(data), "--out", str(tmp_path), "--select", "kappa", *QUICK])
    assert exit_info.value.code == 2
    assert (
        "--select kappa: a binary task has no such metric; it has auc, accuracy, f1, macro_f1"
        in capsys.readouterr().err
    )
    assert FinetuneSettings().select is None

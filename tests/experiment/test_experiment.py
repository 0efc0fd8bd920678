"""The experiment command (ilm_dist.experiment): its file's checks, the cells it plans, its state file, the
paired two-level bootstrap against a direct recomputation, and a 2-method x 2-seed experiment run end to
end with every cell's real command line executed in this process (the child-process and Ray paths are
in test_experiment_processes.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from data_tools.splits import group_function
from ilm_dist.config import ConfigError, load_config
from ilm_dist.eval.__main__ import main as eval_main
from ilm_dist.eval.commands import analyse_parser, finetune_parser, probe_parser
from ilm_dist.eval.metrics import compute_metrics
from ilm_dist.experiment.backends import run_command
from ilm_dist.experiment.cells import cka_params, plan
from ilm_dist.experiment.command import experiment_main, run_experiment
from ilm_dist.experiment.config import load_experiment
from ilm_dist.experiment.state import State
from ilm_dist.experiment.stats import Resamples, over_seeds, paired_difference, resampled_metric, score
from ilm_dist.folder_lock import FolderBusy, FolderLock
from ilm_dist.paths import NAME_RULE
from ilm_dist.plan import build_plan
from ilm_dist.pretrain import pretrain_parser
from ilm_dist.processes import module_command
from tests.eval.support import pack_dataset
from tests.launcher import REPO

DEMO = REPO / "configs" / "demo.yaml"
TINY_RUN = [
    "data.image_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "moco.queue_size=32",
    "train.max_steps=2",
    "train.log_every=1",
]
QUICK = {"evals": 1, "n_boot": 20}


def experiment_dict(data: Path, out: Path, **changes) -> dict:
    """A tiny experiment: MoCo (2 pretraining steps) and random init, every evaluation at 50% and 100%."""
    raw = {
        "name": "tiny",
        "dataset": str(data),
        "output_dir": str(out),
        "seeds": [0],
        "fractions": [0.5, 1.0],
        "overrides": TINY_RUN,
        "methods": {
            "moco": {"config": str(DEMO), "overrides": ["loss.type=none"]},
            "random_init": {"config": str(DEMO), "weights": "random"},
        },
        "evaluations": {
            "probe": {"fractions": [0.5], "epochs": 2, **QUICK},
            "linear": {"epochs": 1, "batch_size": 16, **QUICK},
            "full": {"epochs": 1, "batch_size": 16, **QUICK},
            "analyse": {"num_subsets": 2, "subset_size": 8},
        },
        "report": {"n_boot": 100, "seed": 3},
        "execution": {"pretrain": {"cpus": 1}, "eval": {"cpus": 1}},
    }
    return raw | changes


def write_experiment(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 48, "val": 16, "test": 24}, num_classes=2)


# --------------------------------------------------------------------------- the experiment file


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seedz": [0]}, "unknown key 'seedz' (did you mean 'seeds'?)"),
        ({"seeds": [0, 0]}, "seeds: [0, 0]: repeated seed"),
        ({"fractions": [0.5, 1.5]}, "fractions: label fraction 1.5: must be in (0, 1]"),
        ({"fractions": [0.01, 1.0]}, "label fraction 0.01 leaves class '0' empty (24 train samples"),
        ({"dataset": "/nowhere"}, "dataset: /nowhere/manifest.json"),
        ({"name": "a b"}, "name: 'a b': letters, digits"),
        ({"reference": "imagenet"}, "reference: 'imagenet' is not a method (moco, random_init)"),
        ({"comparisons": [["moco", "byol"]]}, "comparisons[0]: 'byol' is not a method"),
        ({"comparisons": [["moco"]]}, "comparisons[0]: ['moco']: expected [a, b]"),
        ({"overrides": ["seed=3"]}, "overrides: 'seed=3': seed is set by the experiment"),
        ({"methods": {"m": {"config": "nowhere.yaml"}}}, "methods.m.config: file not found: "),
        (
            {"methods": {"m": {"confg": "x"}}},
            "unknown key 'methods.m.confg' (did you mean 'methods.m.config'?)",
        ),
        (
            {"methods": {"subsets": {"config": str(DEMO)}}},
            "methods: 'subsets': reserved, EVAL_DIR/subsets holds the label subsets",
        ),
        (
            {"methods": {"..": {"config": str(DEMO)}}},
            "methods: '..': letters, digits, '_', '.', '-' only, not '.' or '..', not starting with '-' (it names a folder)",
        ),
        ({"methods": {".": {"config": str(DEMO)}}}, "methods: '.': letters, digits"),
        ({"methods": {"a/b": {"config": str(DEMO)}}}, "methods: 'a/b': letters, digits"),
        ({"methods": {"-x": {"config": str(DEMO)}}}, "methods: '-x': letters, digits"),
        ({"methods": {"": {"config": str(DEMO)}}}, "methods: '': letters, digits"),
        ({"methods": {1: {"config": str(DEMO)}}}, "methods: 1: letters, digits"),
        ({"name": ".."}, "name: '..': letters, digits"),
        (
            {"methods": {"m": {"config": str(DEMO), "overrides": ["data.shards=/x"]}}},
            "methods.m.overrides: 'data.shards=/x': data.shards is set by the experiment",
        ),
        (
            {"methods": {"m": {"config": str(DEMO), "overrides": ["train.max_stpes=3"]}}},
            "unknown key 'train.max_stpes' (did you mean 'train.max_steps'?)",
        ),
        ({"methods": {"m": {"config": str(DEMO), "weights": "nowhere.pt"}}}, "methods.m.weights: not found"),
        ({"evaluations": {"knn": {}}}, "evaluations.knn: unknown evaluation"),
        ({"evaluations": {"linear": {"epoch": 1}}}, "did you mean 'evaluations.linear.epochs'?"),
        ({"evaluations": {"linear": {"epochs": 0}}}, "evaluations.linear: --epochs 0: must be >= 1"),
        ({"evaluations": {"linear": {"mode": "full"}}}, "evaluations.linear.mode: set by the experiment"),
        ({"evaluations": {"probe": {"seed": 1}}}, "evaluations.probe.seed: set by the experiment"),
        (
            {"evaluations": {"full": {"train_aug": "strong"}}},
            "evaluations.full.train_aug: 'strong' is not one of",
        ),
        (
            {"evaluations": {"probe": {}, "analyse": {}}},
            "evaluations.analyse: computes CKA of full fine-tuning",
        ),
        ({"eval_options": {"weights": "x"}}, "eval_options.weights: unknown key"),
        (
            {"execution": {"pretrain": {"gpus": 2, "ranks": 1}}},
            "execution.pretrain.ranks: with GPUs, one rank",
        ),
        ({"report": {"n_boot": 0}}, "report.n_boot: must be >= 1"),
        ({"protocol": "offical"}, "protocol: --protocol offical: not a protocol name (ilm_dist, official"),
        ({"protocol": "official", "protocol_dataset": "nih"}, "protocol_dataset: --dataset nih: protocol"),
    ],
)
def test_experiment_file_errors_name_the_key(tmp_path, data, change, message):
    path = write_experiment(tmp_path / "exp.yaml", experiment_dict(data, tmp_path / "out", **change))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert message in str(err.value)


def test_paths_are_relative_to_the_experiment_file(tmp_path, data, monkeypatch):
    here = tmp_path / "experiments"
    here.mkdir()
    shutil.copytree(data, tmp_path / "data")
    raw = experiment_dict(Path("../data"), Path("../out"))
    raw["methods"]["moco"]["config"] = os.path.relpath(DEMO, here)
    path = write_experiment(here / "exp.yaml", raw)
    monkeypatch.chdir("/")
    exp = load_experiment(path, ["report.n_boot=7", f"output_dir={tmp_path / 'cli'}"])
    assert exp.dataset == tmp_path / "data" and exp.methods["moco"].config == DEMO
    assert exp.output == tmp_path / "cli" and exp.settings.report.n_boot == 7  # from the command line
    assert Path(exp.run_config(exp.methods["moco"], 0).data.shards) == tmp_path / "data"
    assert exp.settings.reference == "random_init" and exp.comparisons == [("moco", "random_init")]


def test_cells_run_the_real_commands_with_the_experiment_settings(tmp_path, data):
    raw = experiment_dict(data, tmp_path / "out", seeds=[0, 3], comparisons=[["random_init", "moco"]])
    exp = load_experiment(write_experiment(tmp_path / "exp.yaml", raw))
    cells = {c.id: c for c in plan(exp)}
    assert list(cells)[:5] == [
        f"s0/moco/{k}" for k in ("pretrain", "probe_f0.5", "linear", "full", "analyse")
    ]
    assert len(cells) == 2 * (5 + 4)
    for seed in (0, 3):
        pretrain = cells[f"s{seed}/moco/pretrain"]
        args = pretrain_parser().parse_intermixed_args(list(pretrain.module_args[1:]))
        cfg = load_config(args.config, args.overrides)
        assert (cfg.seed, cfg.name, cfg.loss.type) == (seed, "moco", "none")
        assert Path(cfg.output_dir) == tmp_path / "out" / "runs" / f"moco_s{seed}"
        assert Path(cfg.data.shards) == data and cfg.data.image_size == 32
        for method in ("moco", "random_init"):
            linear = cells[f"s{seed}/{method}/linear"]
            assert linear.needs == ((f"s{seed}/moco/pretrain",) if method == "moco" else ())
            assert linear.module_args[:2] == ("ilm_dist.eval", "finetune")
            ft = finetune_parser().parse_intermixed_args(list(linear.module_args[2:]))
            # every method of a seed in one EVAL_DIR with that seed: the same label subsets
            assert (Path(ft.out), ft.name, ft.seed) == (tmp_path / "out" / "evals" / f"s{seed}", method, seed)
            assert (ft.mode, ft.fractions, ft.epochs, ft.n_boot) == ("linear", [0.5, 1.0], 1, 20)
            assert ft.weights == (
                str(tmp_path / "out" / "runs" / f"moco_s{seed}") if method == "moco" else "random"
            )
            if method == "random_init":  # its random network is seeded by the seed too
                assert load_config(ft.config, ft.overrides).seed == seed
            probe = probe_parser().parse_intermixed_args(
                list(cells[f"s{seed}/{method}/probe_f0.5"].module_args[2:])
            )
            assert (probe.fraction, probe.seed, probe.epochs) == (0.5, seed, 2)
            analyse = analyse_parser().parse_intermixed_args(
                list(cells[f"s{seed}/{method}/analyse"].module_args[2:])
            )
            assert (analyse.num_subsets, analyse.subset_size) == (2, 8)
    with_protocol = load_experiment(
        write_experiment(tmp_path / "p.yaml", raw | {"protocol": "official", "protocol_dataset": "idc"})
    )
    for experiment, protocol in ((exp, "ilm_dist"), (with_protocol, "official")):
        for cell in plan(experiment):
            if cell.kind in ("probe", "linear", "full"):
                parser = probe_parser() if cell.kind == "probe" else finetune_parser()
                args = parser.parse_intermixed_args(list(cell.module_args[2:]))
                assert (args.protocol, getattr(args, "dataset", None)) == (
                    protocol,
                    "idc" if protocol == "official" else None,
                )
            else:
                assert "--protocol" not in cell.module_args, cell.id
    assert with_protocol.protocol.dataset == "idc" and cka_params(with_protocol).absolute_sigma


def test_state_file_progress_line_and_lock(tmp_path, data):
    exp = load_experiment(write_experiment(tmp_path / "exp.yaml", experiment_dict(data, tmp_path / "out")))
    cells = plan(exp)
    state = State(exp.output, exp.name, cells)
    assert "0/9 cells done" in state.progress_line() and "time left unknown" in state.progress_line()
    state.start(cells[0], "logs/x.log")
    state.started_at[cells[0].id] -= 100  # it started 100 s ago
    state.finish(cells[0], None, 0)
    state.start(cells[1], "logs/y.log")
    state.finish(cells[1], "exit status 2: error: bad", 2)
    state.block(cells[4].id, "needs s0/moco/probe_f0.5, which failed")
    saved = json.loads((exp.output / "state.json").read_text())
    assert saved["cells"][cells[0].id]["status"] == "done" and saved["cells"][cells[0].id]["seconds"] >= 100
    assert saved["cells"][cells[1].id] | {"seconds": None} == {
        "kind": "probe",
        "status": "failed",
        "attempts": 1,
        "seconds": None,
        "error": "exit status 2: error: bad",
        "log": "logs/y.log",
        "signature": None,
    }
    line = state.progress_line()
    assert "1/9 cells done, 0 running, 1 failed, 1 blocked, 6 to do" in line
    # 6 cells to do at the mean duration of the finished ones: the pretraining's ~100 s
    assert "about 10 min left" in line or "about 11 min left" in line
    events = [json.loads(x)["event"] for x in (exp.output / "history.jsonl").read_text().splitlines()]
    assert events == ["start", "done", "start", "failed"]
    lock = FolderLock(exp.output, "experiment runner")
    try:
        with pytest.raises(FolderBusy, match=rf"is in use by experiment runner pid {os.getpid()} on "):
            FolderLock(exp.output, "experiment runner")
    finally:
        lock.release()
    FolderLock(exp.output, "experiment runner").release()  # free again


# --------------------------------------------------------------------------- statistics


def direct_two_level_bootstrap(labels, probs_a, probs_b, n_boot, seed):
    """The interval written out with loops and sklearn, following the documented draws."""
    rng = np.random.default_rng(seed)
    n, k = len(labels), len(probs_a)
    images = rng.integers(0, n, size=(n_boot, n))
    seeds = rng.integers(0, k, size=(n_boot, k))
    stats = []
    for r in range(n_boot):
        idx = images[r]
        if len(set(labels[idx])) < 2:
            continue
        diffs = [
            roc_auc_score(labels[idx], probs_a[s][idx, 1]) - roc_auc_score(labels[idx], probs_b[s][idx, 1])
            for s in seeds[r]
        ]
        stats.append(sum(diffs) / len(diffs))
    point = np.mean(
        [
            roc_auc_score(labels, a[:, 1]) - roc_auc_score(labels, b[:, 1])
            for a, b in zip(probs_a, probs_b, strict=True)
        ]
    )
    return point, np.percentile(stats, [2.5, 97.5])


def test_paired_two_level_bootstrap_matches_a_direct_computation():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 30)

    def probs(shift):
        p = 1 / (1 + np.exp(-(labels * shift + rng.normal(size=30))))
        return np.stack([1 - p, p], axis=1)

    a, b = [probs(2.0) for _ in range(3)], [probs(0.5) for _ in range(3)]
    resamples = Resamples.draw(30, 3, 150, seed=11)
    got = paired_difference(
        score("binary", labels, a, ("0", "1"), "auc", resamples),
        score("binary", labels, b, ("0", "1"), "auc", resamples),
        resamples,
    )
    point, (low, high) = direct_two_level_bootstrap(labels, a, b, 150, 11)
    assert got.diff == pytest.approx(point, abs=1e-12)
    assert got.ci == pytest.approx((low, high), abs=1e-12)
    assert low < point < high


def test_intervals_over_seeds_are_student_t():
    values = [0.71, 0.74, 0.69, 0.75]
    s = over_seeds(values)
    expected = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert s.ci == pytest.approx(expected) and s.std == pytest.approx(np.std(values, ddof=1))
    assert np.isnan(over_seeds([0.7]).ci[0])


# --------------------------------------------------------------------------- end to end, in this process


class InProcess:
    """Runs each evaluation cell's exact command line (``python -m ilm_dist.eval ARGS``) through its main
    in this process, and records which cells ran. Pretraining cells run as child processes: DeepSpeed's
    process-group state does not survive a second run in one process."""

    def __init__(self):
        self.ran: list[str] = []

    def __call__(self, cell, log_path: Path) -> int:
        self.ran.append(cell.id)
        module, *args = cell.module_args
        if module == "ilm_dist.pretrain":
            return run_command(cell.module_args, cell.resources, log_path, log_path.parent)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            try:
                eval_main(args)
                return 0
            except SystemExit as exit_:
                return exit_.code or 0


def mtimes(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in (".json", ".npz", ".pt")
        and "report" not in p.parts
        and p.name != "state.json"
    }


def recompute_difference(exp_out: Path, seeds: list[int], pair, evaluation, fraction, n_boot, seed):
    """The paired difference and its interval straight from the saved prediction files."""

    def probs(method, s):
        root = exp_out / "evals" / f"s{s}" / method
        if evaluation == "probe_block4":
            saved = np.load(root / "probe" / f"f{fraction:g}" / "predictions.npz")
            return saved["labels"], saved["block4_probs"]
        saved = np.load(root / "finetune" / f"{evaluation}_f{fraction:g}" / "predictions.npz")
        return saved["labels"], saved["probs"]

    labels = probs(pair[0], seeds[0])[0]
    a, b = [probs(pair[0], s)[1] for s in seeds], [probs(pair[1], s)[1] for s in seeds]
    for s in seeds:
        np.testing.assert_array_equal(probs(pair[1], s)[0], labels)
    return direct_two_level_bootstrap(labels, a, b, n_boot, seed)


@pytest.mark.slow  # whole commands: pretraining runs as child processes
def test_experiment_end_to_end_resumes_and_adds_a_seed(tmp_path, data):
    out = tmp_path / "out"
    path = write_experiment(tmp_path / "exp.yaml", experiment_dict(data, out))
    first = InProcess()
    assert run_experiment(str(path), execute=first) == 0
    assert first.ran == [c.id for c in plan(load_experiment(path))]
    saved = mtimes(out)
    assert any(k.endswith("backbone.pt") for k in saved) and any(k.endswith("cka.json") for k in saved)

    again = InProcess()  # everything is saved: nothing runs, nothing is rewritten
    assert run_experiment(str(path), execute=again) == 0
    assert again.ran == [] and mtimes(out) == saved

    two_seeds = InProcess()  # a new seed: only its cells run
    assert run_experiment(str(path), ["seeds=[0,1]"], execute=two_seeds) == 0
    assert two_seeds.ran and all(cell.startswith("s1/") for cell in two_seeds.ran)
    assert len(two_seeds.ran) == 9 and all(mtimes(out)[k] == v for k, v in saved.items())

    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["dataset"] == data.name and summary["seeds"] == 2
    keys = [(c["a"], c["b"], c["eval"], c["fraction"]) for c in summary["comparisons"]]
    assert keys == [
        ("moco", "random_init", evaluation, fraction)
        for evaluation, fractions in (("linear", [0.5, 1.0]), ("full", [0.5, 1.0]), ("probe_block4", [0.5]))
        for fraction in fractions
    ]
    for c in summary["comparisons"]:
        assert set(c) == {"a", "b", "eval", "fraction", "metric", "diff", "ci"} and c["metric"] == "auc"
        point, ci = recompute_difference(out, [0, 1], (c["a"], c["b"]), c["eval"], c["fraction"], 100, 3)
        assert c["diff"] == pytest.approx(point, abs=1e-12)
        assert c["ci"] == pytest.approx(list(ci), abs=1e-12)
    text = (report / "report.md").read_text()
    assert (
        text.index("## Paired differences")
        < text.index("## Test metric per method")
        < text.index("## Per-block")
    )
    assert "| moco − random_init |" in text and "## CKA per block" in text and "## Kolmogorov-Smirnov" in text
    for name in ("differences", "finetune", "probe", "cka", "ks"):
        assert (report / f"{name}.png").stat().st_size > 1000
    state = json.loads((out / "state.json").read_text())
    assert {c["status"] for c in state["cells"].values()} == {"done"} and len(state["cells"]) == 18


def test_changed_settings_are_refused_not_silently_reused(tmp_path, data):
    out = tmp_path / "out"
    raw = experiment_dict(data, out, evaluations={"linear": {"epochs": 1, "batch_size": 16, **QUICK}})
    raw["methods"] = {"random_init": raw["methods"]["random_init"]}
    path = write_experiment(tmp_path / "exp.yaml", raw)
    assert run_experiment(str(path), execute=InProcess()) == 0
    raw["evaluations"]["linear"]["epochs"] = 2
    write_experiment(path, raw)
    with pytest.raises(
        ConfigError,
        match=r"linear_f0.5/metrics.json was computed with epochs=1, the experiment says epochs=2",
    ):
        run_experiment(str(path), execute=InProcess())


@pytest.mark.parametrize(
    ("task", "metric"),
    [
        ("binary", "auc"),
        ("binary", "accuracy"),
        ("binary", "f1"),
        ("multiclass", "macro_auc"),
        ("multiclass", "accuracy"),
        ("multilabel", "macro_auc"),
    ],
)
def test_resampled_metrics_equal_compute_metrics_on_each_resample(task, metric):
    rng = np.random.default_rng(2)
    n, classes = 40, ("a", "b", "c")
    if task == "binary":
        classes = ("0", "1")
        labels = rng.integers(0, 2, n)
    elif task == "multiclass":
        labels = rng.integers(0, 3, n)
    else:
        labels = rng.integers(0, 2, (n, 3))
    probs = rng.random((n, len(classes))).round(1)  # ties, as saved probabilities have them
    probs /= probs.sum(axis=1, keepdims=True) + 1e-9
    images = rng.integers(0, n, size=(40, n))
    images[0] = 0
    got = resampled_metric(task, labels, probs, classes, metric, images)
    expected = [compute_metrics(task, labels[r], probs[r], classes)[metric] for r in images]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True)
    assert np.isnan(got[0]) == (metric in ("auc", "macro_auc"))  # a resample of one image: no AUC


def test_a_failed_cell_is_recorded_with_its_error_and_the_others_go_on(tmp_path, data):
    out = tmp_path / "out"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    raw = experiment_dict(data, out, evaluations={"linear": {"epochs": 1, "batch_size": 16, **QUICK}})
    raw["methods"] = {
        "broken": {"config": str(DEMO), "weights": str(broken)},
        "random_init": raw["methods"]["random_init"],
    }
    path = write_experiment(tmp_path / "exp.yaml", raw)
    ran = InProcess()
    assert run_experiment(str(path), execute=ran) == 1  # incomplete
    assert ran.ran == ["s0/broken/linear", "s0/random_init/linear"]
    cells = json.loads((out / "state.json").read_text())["cells"]
    assert cells["s0/random_init/linear"]["status"] == "done"
    failed = cells["s0/broken/linear"]
    assert failed["status"] == "failed" and failed["error"].startswith("exit status 2: error: ")
    assert str(broken) in failed["error"], failed["error"]
    report = (out / "report" / "report.md").read_text()
    assert "`s0/broken/linear`: failed: exit status 2" in report and "broken − random_init" in report
    assert json.loads((out / "report" / "summary.json").read_text())["comparisons"] == []


def test_the_command_reports_a_bad_experiment_file_in_one_line(tmp_path, data, capsys):
    path = write_experiment(tmp_path / "exp.yaml", experiment_dict(data, tmp_path / "out", seeds=[1, 1]))
    with pytest.raises(SystemExit) as exit_:
        experiment_main(["--config", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {path}: seeds: [1, 1]: repeated seed\n"


def test_a_method_named_dot_dot_is_refused_before_any_work(tmp_path, data, capsys):
    """The issue's case: method '..' put both seeds' evaluations in evals/, so seed 1 reused seed 0's."""
    raw = experiment_dict(data, tmp_path / "out", seeds=[0, 1])
    raw["methods"] = {"..": {"config": str(DEMO), "weights": "random"}}
    raw["evaluations"] = {"probe": raw["evaluations"]["probe"]}
    path = write_experiment(tmp_path / "exp.yaml", raw)
    with pytest.raises(SystemExit) as exit_:
        experiment_main(["--config", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr() == ("", f"error: {path}: methods: '..': {NAME_RULE}\n")
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_a_file_as_output_dir_in_one_line(tmp_path, data, capsys):
    (tmp_path / "f").touch()
    path = write_experiment(tmp_path / "exp.yaml", experiment_dict(data, tmp_path / "f" / "out"))
    with pytest.raises(SystemExit) as exit_:
        experiment_main(["--config", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"error: output_dir {tmp_path}/f/out: cannot be created, {tmp_path}/f is a file, not a directory\n"
    )


def test_the_shipped_demo_experiment_plans_its_cells_under_the_launcher(tmp_path, data):
    exp = load_experiment(
        REPO / "configs" / "experiments" / "demo.yaml",
        [
            f"dataset={data}",
            f"output_dir={tmp_path}",
            "fractions=[0.5,1.0]",
            "evaluations.probe.fractions=[0.5]",
        ],
    )
    cells = plan(exp)
    per_seed = {"moco": 6 - 1, "moco_mse": 6 - 1, "random_init": 5 - 1}  # one probe fraction of two
    assert len(cells) == 2 * sum(per_seed.values())
    assert exp.comparisons == [("moco", "random_init"), ("moco_mse", "random_init"), ("moco_mse", "moco")]
    pretrain = next(c for c in cells if c.kind == "pretrain")
    cmd, env = module_command(pretrain.module_args, pretrain.resources)  # 2 CPU ranks, as make demo
    launcher = cmd[cmd.index("--") + 1 :] if "--" in cmd else cmd
    assert Path(launcher[0]).name == "deepspeed" and launcher[launcher.index("--num_gpus") + 1] == "2"
    assert launcher[launcher.index("--module") + 1 :] == list(pretrain.module_args)
    assert env["DS_ACCELERATOR"] == "cpu"
    # the whole machine: the ranks place themselves (ilm_dist.cpu_placement), no thread count imposed
    assert env.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
    analyse = next(c for c in cells if c.kind == "analyse")  # one process
    one = module_command(analyse.module_args, analyse.resources)[0]
    assert Path(one[one.index("-m") - 1]).name.startswith("python") and "deepspeed" not in " ".join(one)
    assert one[one.index("-m") + 1 :] == list(analyse.module_args)


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> Path:
    """A multi-label set, for the NIH experiment at GPU scale (14 findings there)."""
    return pack_dataset(tmp_path_factory.mktemp("findings"), {"train": 48, "val": 16, "test": 24}, 4, True)


@pytest.mark.parametrize("name", ["idc_cpu", "nih64_cpu", "pneumonia_cpu", "idc_gpu", "nih_gpu"])
def test_the_shipped_paper_experiments_pretrain_every_method_and_seed(tmp_path, data, findings, name):
    dataset = findings if name == "nih_gpu" else data
    changes = [f"dataset={dataset}", f"output_dir={tmp_path}", "fractions=[0.5,1.0]"]
    exp = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml", changes)
    pretrained = ["moco", "moco_mse", "moco_bt"]
    assert exp.comparisons == [(m, "random_init") for m in pretrained] + [
        ("moco_mse", "moco"),
        ("moco_bt", "moco"),
    ]
    cells = plan(exp)
    assert sorted(c.id for c in cells if c.kind == "pretrain") == [
        f"s{seed}/{m}/pretrain" for seed in (0, 1, 2) for m in sorted(pretrained)
    ]
    for cell in (c for c in cells if c.kind == "pretrain"):
        args = pretrain_parser().parse_intermixed_args(list(cell.module_args[1:]))
        run = load_config(args.config, args.overrides)
        method = cell.id.split("/")[1]
        assert run.loss.type == {"moco": "none", "moco_mse": "mse", "moco_bt": "bt"}[method]
        assert Path(run.data.shards) == dataset and run.name == method


def test_the_pneumonia_packing_groups_images_by_patient():
    """The --group-by of pneumonia_cpu.yaml's packing command maps each file-name pattern of the source to
    its patient (PROVENANCE.md of pneumonia_cxr_128)."""
    header = (REPO / "configs" / "experiments" / "pneumonia_cpu.yaml").read_text()
    group_of = group_function(re.search(r"--group-by '([^']+)'", header).group(1))
    assert {
        path: group_of(path)
        for path in (
            "PNEUMONIA/person1430_bacteria_3695.jpeg",
            "PNEUMONIA/person12_virus_39_2.jpeg",
            "NORMAL/IM-0435-0001.jpeg",
            "NORMAL/IM-0437-0001-0002.jpeg",
            "NORMAL/NORMAL2-IM-0123-0001.jpeg",
            "NORMAL/NORMAL2-IM-1345-0001-0002.jpeg",
        )
    } == {
        "PNEUMONIA/person1430_bacteria_3695.jpeg": "person1430",
        "PNEUMONIA/person12_virus_39_2.jpeg": "person12",
        "NORMAL/IM-0435-0001.jpeg": "IM-0435",
        "NORMAL/IM-0437-0001-0002.jpeg": "IM-0437",
        "NORMAL/NORMAL2-IM-0123-0001.jpeg": "NORMAL2-IM-0123",
        "NORMAL/NORMAL2-IM-1345-0001-0002.jpeg": "NORMAL2-IM-1345",
    }


CPU_EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*_cpu.yaml"))


@pytest.fixture(scope="module")
def hundred(tmp_path_factory) -> Path:
    """A synthetic set with 50 train images per class, the fewest that keep one per class at 1% labels."""
    return pack_dataset(
        tmp_path_factory.mktemp("hundred"), {"train": 100, "val": 8, "test": 8}, num_classes=2
    )


def test_the_cpu_experiments_are_the_shipped_ones():
    assert {p.stem for p in CPU_EXPERIMENTS} >= {"idc_cpu", "nih64_cpu", "pneumonia_cpu"}


@pytest.mark.parametrize("path", CPU_EXPERIMENTS, ids=lambda path: path.stem)
def test_every_cpu_experiment_resolves_and_dry_runs_on_the_synthetic_set(path, hundred, tmp_path, capsys):
    """The file as shipped (its fractions, methods, evaluations) on a synthetic set: every cell is printed
    with its command, and every pretraining run config plans (shapes, memory) without a warning."""
    changes = [f"dataset={hundred}", f"output_dir={tmp_path}"]
    assert run_experiment(str(path), changes, dry_run=True) == 0
    printed = capsys.readouterr().out.splitlines()
    exp = load_experiment(path, changes)
    cells = plan(exp)
    assert [line.split()[2] for line in printed[::2]] == [cell.id for cell in cells]
    assert all(line.startswith("to do ") for line in printed[::2])
    split = exp.manifest.split("train")
    for method in (m for m in exp.methods.values() if m.pretrained):
        cfg = exp.run_config(method, exp.seeds[0])
        built = build_plan(cfg, 1, 1, split.num_samples, len(split.shards))
        assert built.warnings == []
        assert (
            f"{cfg.model.arch}, {cfg.model.stem} stem; blocks 1-4 at {cfg.data.image_size} px"
            in built.render()
        )

"""ilm_dist.experiment.report: the report written from hand-made test predictions whose accuracies are known
(k of 30 images right): the paired differences against hand arithmetic and a direct two-level bootstrap,
the per-method means against Student-t intervals from scipy, what is missing, and the cell formatting."""

import csv
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.store import finetune_dir, save_npz
from ilm_dist.experiment.cells import cell_id, plan
from ilm_dist.experiment.config import load_experiment
from ilm_dist.experiment.report import (
    Comparison,
    Results,
    diff_cell,
    mean_cell,
    signed,
    spread_cell,
    write_report,
)
from ilm_dist.experiment.state import State
from tests.eval.support import pack_dataset
from tests.launcher import REPO

DEMO = REPO / "configs" / "demo.yaml"
N_TEST, N_BOOT, BOOT_SEED = 30, 200, 5
FRACTIONS = (0.5, 1.0)
# images right out of 30, per method, seed and fraction; c's seed-1 cell failed
CORRECT = {
    "a": {0: (24, 27), 1: (21, 28)},
    "b": {0: (15, 18), 1: (12, 20)},
    "c": {0: (10, 25)},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pack_dataset(
        tmp_path_factory.mktemp("data"), {"train": 12, "val": 6, "test": N_TEST}, num_classes=3
    )


def probs_with(correct: int, labels: np.ndarray) -> np.ndarray:
    """Probabilities right (argmax = label) on the first ``correct`` images, wrong on the others."""
    predicted = np.where(np.arange(len(labels)) < correct, labels, (labels + 1) % 3)
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), predicted] = 0.8
    return probs


@pytest.fixture(scope="module")
def report(tmp_path_factory, data):
    """The experiment (a, b, c vs reference b; linear at 50% and 100%; seeds 0, 1) and its written report."""
    root = tmp_path_factory.mktemp("exp")
    method = {"config": str(DEMO), "weights": "random"}
    raw = {
        "name": "rep",
        "dataset": str(data),
        "output_dir": str(root / "out"),
        "seeds": [0, 1],
        "fractions": list(FRACTIONS),
        "methods": {"a": method, "b": method, "c": method},
        "reference": "b",
        "evaluations": {"linear": {"epochs": 1}},
        "report": {"n_boot": N_BOOT, "seed": BOOT_SEED},
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(raw))
    exp = load_experiment(root / "exp.yaml")
    labels = np.arange(N_TEST) % 3
    state = State(exp.output, exp.name, plan(exp))
    for name, by_seed in CORRECT.items():
        for seed, counts in by_seed.items():
            for fraction, k in zip(FRACTIONS, counts, strict=True):
                path = finetune_dir(exp.method_dir(name, seed), "linear", fraction) / "predictions.npz"
                save_npz(path, probs=probs_with(k, labels), labels=labels, logits=np.zeros((N_TEST, 3)))
            state.cells[cell_id(seed, name, "linear")] |= {"status": "done"}
    state.cells[cell_id(1, "c", "linear")] |= {"status": "failed", "error": "exit status 2"}
    return exp, write_report(exp, state)


def direct_bootstrap(a: dict, b: dict, fraction_index: int) -> tuple[float, float]:
    """The two-level bootstrap as ilm_dist.experiment.stats documents it, on the hand accuracies."""
    rng = np.random.default_rng(BOOT_SEED)
    images = rng.integers(0, N_TEST, size=(N_BOOT, N_TEST))
    seeds = rng.integers(0, 2, size=(N_BOOT, 2))
    right = {
        m: [np.arange(N_TEST) < by_seed[s][fraction_index] for s in (0, 1)]
        for m, by_seed in (("a", a), ("b", b))
    }
    stat = [
        np.mean([right["a"][s][images[r]].mean() - right["b"][s][images[r]].mean() for s in seeds[r]])
        for r in range(N_BOOT)
    ]
    low, high = np.percentile(stat, [2.5, 97.5])
    return float(low), float(high)


def test_summary_holds_the_paired_differences_by_hand(report):
    exp, path = report
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["dataset"] == exp.dataset.name and summary["seeds"] == 2
    got = {(c["a"], c["b"], c["eval"], c["fraction"]): c for c in summary["comparisons"]}
    assert set(got) == {("a", "b", "linear", 0.5), ("a", "b", "linear", 1.0)}  # c lacks seed 1
    for i, fraction in enumerate(FRACTIONS):
        c = got[("a", "b", "linear", fraction)]
        hand = np.mean([CORRECT["a"][s][i] - CORRECT["b"][s][i] for s in (0, 1)]) / N_TEST  # 0.3, 0.28333
        assert c["metric"] == "accuracy" and c["diff"] == pytest.approx(hand, abs=1e-12)
        assert c["ci"] == pytest.approx(direct_bootstrap(CORRECT["a"], CORRECT["b"], i), abs=1e-12)
        assert c["ci"][0] > 0  # a is right on 6+ more images per seed: the interval excludes 0


def test_the_csvs_hold_every_number(report):
    _, path = report
    with (path.parent / "differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((path.parent / "summary.json").read_text())["comparisons"]
    assert [(float(r["diff"]), float(r["ci_low"]), float(r["ci_high"])) for r in rows] == [
        (c["diff"], *c["ci"]) for c in summary
    ]
    with (path.parent / "per_seed.csv").open() as f:
        per_seed = {
            (r["method"], float(r["fraction"]), int(r["seed"])): float(r["value"]) for r in csv.DictReader(f)
        }
    expected = {
        (m, f, s): CORRECT[m][s][i] / N_TEST
        for m in ("a", "b")
        for s in (0, 1)
        for i, f in enumerate(FRACTIONS)
    }
    assert per_seed == pytest.approx(expected, abs=1e-12)


def student_t(values) -> tuple[float, float, float]:
    mean, half = (
        np.mean(values),
        stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)),
    )
    return mean, mean - half, mean + half


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading``, by their first cell."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_tables_missing_results_and_failed_cells(report):
    _, path = report
    text = path.read_text()
    assert text.startswith("# Experiment rep\n") and "seeds 0, 1, methods a, b, c" in text
    summary = json.loads((path.parent / "summary.json").read_text())["comparisons"]
    diffs = table_rows(text, "## Paired differences")
    assert diffs["a − b"] == [f"**{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]**" for c in summary]
    assert diffs["a − b"][0].startswith("**+0.300 [")
    assert diffs["c − b"] == ["missing", "missing"]
    assert "Not compared: c - b, linear at 50%: results missing for some seeds; c - b, linear at 100%" in text
    means = table_rows(text, "## Test metric per method")
    for name in ("a", "b"):
        expected = []
        for i in range(2):
            mean, low, high = student_t([CORRECT[name][s][i] / N_TEST for s in (0, 1)])
            expected.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        assert means[name] == expected
    assert means["a"][0] == "0.750 [0.115, 1.385]"  # (24 + 21) / 60; t(0.975, 1) = 12.706
    assert means["c"] == ["missing", "missing"]
    assert "- `s1/c/linear`: failed: exit status 2" in text and "5 done, 1 failed." in text
    for name in ("differences", "finetune"):
        assert (path.parent / f"{name}.png").stat().st_size > 1000
    assert not (path.parent / "probe.png").exists()  # no probe evaluation


def test_predictions_from_another_test_split_are_refused(tmp_path):
    results = Results()
    results.add_predictions(("a", "linear", 1.0), 0, np.zeros((3, 2)), np.array([0, 1, 0]), tmp_path / "one")
    with pytest.raises(EvalError) as err:
        results.add_predictions(
            ("b", "linear", 1.0), 0, np.zeros((3, 2)), np.array([0, 1, 1]), tmp_path / "two"
        )
    assert str(err.value).startswith(f"{tmp_path}/two: test labels differ from those of {tmp_path}/one")


@pytest.mark.parametrize(
    ("ci", "bold"), [((0.01, 0.2), True), ((-0.2, -0.01), True), ((-0.01, 0.2), False), ((0.0, 0.2), False)]
)
def test_a_difference_is_bold_when_its_interval_excludes_zero(ci, bold):
    text = diff_cell(Comparison("a", "b", "linear", 1.0, "accuracy", 0.1, ci))
    plain = f"+0.100 [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    assert text == (f"**{plain}**" if bold else plain)


def test_cell_formats():
    assert signed(float("nan")) == "n/a" and signed(0.25) == "+0.250" and signed(-0.0004) == "-0.000"
    assert mean_cell([0.5]) == "0.500" and spread_cell([0.5]) == "0.500"
    assert spread_cell([0.5, 0.7]) == f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f}"
    mean, low, high = student_t([0.2, 0.4, 0.9])
    assert mean_cell([0.2, 0.4, 0.9]) == f"{mean:.3f} [{low:.3f}, {high:.3f}]"

"""Test metrics per task type (Kaku et al. 2021, Sec. 4) and percentile-bootstrap confidence intervals.

- multilabel (NIH ChestX-ray14): ROC AUC per finding and their macro mean (``macro_auc``);
- binary (IDC histopathology, referable DR): ROC AUC of the positive class, accuracy, F1 of the positive
  class and the macro F1 over both classes (what the official IDC code reports);
- ordinal (diabetic retinopathy grades, classes in grade order): accuracy and quadratic weighted kappa
  over the class indices, which is meaningful only because the packer made the order explicit
  (``--ordinal --classes ...``);
- multiclass (nominal classes, and every ``multiclass`` manifest written before the ``ordinal`` task
  existed, whose class order was alphabetical): accuracy, macro F1 and the macro mean of the
  one-vs-rest ROC AUCs (``macro_auc``, sklearn's ``multi_class="ovr", average="macro"``); no kappa.

Models output one logit per class for every task (cross-entropy for binary/multiclass, as the
official code does; sigmoid + BCE for multilabel). The 95% intervals (:data:`CI_STYLES`) are by
default the 2.5/97.5 percentiles of the metric over ``n_boot`` resamples of the test set with
replacement; the official code reports ``mean +- 1.96 std / sqrt(n_boot)`` of 500 resamples instead
(``official``), the (much narrower) interval of the bootstrap *mean*, whose std for NIH pools the
per-finding AUCs of every resample.

Model selection on val and the headline test metric may be any metric of the task (:func:`task_metrics`),
by default its primary one (:data:`PRIMARY`).
"""

from __future__ import annotations

import warnings

import numpy as np
import sklearn
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from ilm_dist.eval.errors import EvalError

PRIMARY = {"binary": "auc", "multiclass": "accuracy", "ordinal": "kappa", "multilabel": "macro_auc"}
METRICS = {  # the summary metrics of each task, primary first (multilabel also has auc/<finding>)
    "binary": ("auc", "accuracy", "f1", "macro_f1"),
    "multiclass": ("accuracy", "macro_f1", "macro_auc"),
    "ordinal": ("kappa", "accuracy"),
    "multilabel": ("macro_auc",),
}
CI_STYLES = ("percentile", "official")
OFFICIAL_Z = 1.96  # official fine-tuning code: mean +- 1.96 * std / sqrt(resamples)


def probabilities(task: str, logits: np.ndarray) -> np.ndarray:
    """[N, C] class probabilities: sigmoid per finding (multilabel), softmax otherwise."""
    return expit(logits) if task == "multilabel" else softmax(logits, axis=1)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def _nan_mean(values) -> float:
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _macro_f1(labels: np.ndarray, predicted: np.ndarray, classes: list[int]) -> float:
    return float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0.0))


def compute_metrics(
    task: str, labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """Metrics of one prediction set; AUC is NaN where a class has only one label value."""
    if task == "multilabel":
        per_class = {f"auc/{name}": _auc(labels[:, c], probs[:, c]) for c, name in enumerate(class_names)}
        return {"macro_auc": _nan_mean(per_class.values()), **per_class}
    predicted = probs.argmax(axis=1)
    accuracy = float(accuracy_score(labels, predicted))
    classes = list(range(len(class_names)))
    if task == "binary":
        f1 = float(f1_score(labels, predicted, zero_division=0.0))
        return {
            "auc": _auc(labels, probs[:, 1]),
            "accuracy": accuracy,
            "f1": f1,
            "macro_f1": _macro_f1(labels, predicted, classes),
        }
    if task == "multiclass":
        # one-vs-rest AUC per class, averaged over the classes present with both label values (as
        # sklearn's macro "ovr" when every class is present; a bootstrap resample may miss one)
        macro_auc = _nan_mean(_auc(labels == c, probs[:, c]) for c in classes)
        return {
            "accuracy": accuracy,
            "macro_f1": _macro_f1(labels, predicted, classes),
            "macro_auc": macro_auc,
        }
    if task != "ordinal":
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRIMARY)}")
    with warnings.catch_warnings():  # kappa of a constant prediction is 0/0
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = float(cohen_kappa_score(labels, predicted, weights="quadratic", labels=classes))
    return {"accuracy": accuracy, "kappa": 0.0 if np.isnan(kappa) else kappa}


def task_metrics(task: str) -> tuple[str, ...]:
    """The summary metrics :func:`compute_metrics` returns for ``task``, its primary one first."""
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(METRICS)}")
    return METRICS[task]


def check_metric(name: str | None, task: str, flag: str) -> str:
    """``name`` (default: the task's primary metric) when ``task`` has it, else an :class:`EvalError`."""
    if name is None:
        return PRIMARY[task]
    if name not in task_metrics(task):
        raise EvalError(
            f"{flag} {name}: a {task} task has no such metric; it has {', '.join(task_metrics(task))}"
        )
    return name


def bootstrap_ci(
    task: str,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: tuple[str, ...],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    style: str = "percentile",
) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` over ``n_boot`` resamples with replacement (NaN resamples are skipped).

    ``percentile``: the ``(1 - level) / 2`` tails of the resampled metric. ``official`` (for ``level``
    0.95): mean +- 1.96 std / sqrt(n_boot) of the resampled metric, the mean and std of ``macro_auc``
    taken over every resample's per-class AUCs together, as the official NIH code does.
    """
    if style not in CI_STYLES:
        raise ValueError(f"unknown CI style {style!r}; expected one of {CI_STYLES}")
    rng = np.random.default_rng(seed)
    # sklearn's per-call input checks cost more than the metrics; resamples are rows of the same arrays
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        draws = [
            compute_metrics(task, labels[idx], probs[idx], class_names)
            for idx in rng.integers(0, len(labels), size=(n_boot, len(labels)))
        ]
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name in draws[0]:
        values = _finite([d[name] for d in draws])
        if not len(values):
            intervals[name] = [np.nan, np.nan]
        elif style == "percentile":
            intervals[name] = np.percentile(values, [tail, 100 - tail]).tolist()
        else:
            if task == "multilabel" and name == "macro_auc":
                values = _finite([d[f"auc/{c}"] for d in draws for c in class_names])
            mean, half = float(np.mean(values)), OFFICIAL_Z * float(np.std(values)) / float(np.sqrt(n_boot))
            intervals[name] = [mean - half, mean + half]
    return intervals


def _finite(values: list[float]) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    return array[~np.isnan(array)]


def evaluate_predictions(
    task: str,
    labels: np.ndarray,
    logits: np.ndarray,
    class_names: tuple[str, ...],
    n_boot: int,
    seed: int,
    ci: str = "percentile",
    report: str | None = None,
) -> dict:
    """Point estimates and bootstrap intervals (``ci`` style) for one model's test logits; ``primary`` is
    the headline metric ``report`` (default: the task's primary metric)."""
    probs = probabilities(task, logits)
    return {
        "metrics": compute_metrics(task, labels, probs, class_names),
        "ci95": bootstrap_ci(task, labels, probs, class_names, n_boot, seed, style=ci) if n_boot else {},
        "ci_style": ci,
        "primary": report or PRIMARY[task],
    }

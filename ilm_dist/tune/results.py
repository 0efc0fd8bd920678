"""The sweep's outputs: a results table (CSV), a plot of the metric by loss type and layer subset,
and the best trial's configuration as a normal run config YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ilm_dist.config import ConfigError, RunConfig, save_config
from ilm_dist.losses import NO_LOSS, loss_types
from ilm_dist.train.run_dir import RunDir
from ilm_dist.tune.space import plain
from ilm_dist.tune.spec import Sweep


@dataclass
class TrialRecord:
    trial_id: str
    status: str  # completed | stopped (early, by the scheduler) | error | unfinished (sweep interrupted)
    sampled: dict[str, Any]  # the sample of the search space
    cfg: RunConfig | None  # resolved run config (None when the sample itself is invalid)
    history: pd.DataFrame | None  # one row per report; None before the first
    error: str


def collect(experiment: Path, sweep: Sweep) -> list[TrialRecord]:
    """One record per trial of the Ray experiment in ``experiment``, as saved on disk."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    return [_record(trial, frames.get(trial.trial_id), sweep) for trial in analysis.trials]


def _record(trial: Any, history: pd.DataFrame | None, sweep: Sweep) -> TrialRecord:
    run_dir = sweep.trials_dir / trial.trial_id
    sampled = {key: plain(value) for key, value in trial.config.items()}
    try:
        cfg = sweep.run_config(sampled, run_dir, trial.trial_id)
    except ConfigError:
        cfg = None
    error = error_text(Path(trial.path) / "error.txt") if trial.status == "ERROR" else ""
    return TrialRecord(trial.trial_id, _status(trial.status, run_dir), sampled, cfg, history, error)


def _status(ray_status: str, run_dir: Path) -> str:
    if ray_status == "ERROR":
        return "error"
    if ray_status != "TERMINATED":
        return "unfinished"
    return "completed" if RunDir(run_dir).final_state.exists() else "stopped"


def error_text(error_file: Path) -> str:
    """The last line of Ray's error.txt: the trial's own exception, e.g. ``TrialFailed: ...``."""
    if not error_file.exists():
        return "(no error.txt)"
    lines = [line for line in error_file.read_text().splitlines() if line.strip()]
    name, _, message = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message}"


def metric_values(record: TrialRecord, metric: str) -> pd.Series:
    if record.history is None or metric not in record.history:
        return pd.Series(dtype=float)
    return record.history[metric].dropna()


def best_value(record: TrialRecord, metric: str, mode: str) -> float | None:
    values = metric_values(record, metric)
    if values.empty:
        return None
    return float(values.max() if mode == "max" else values.min())


def layer_label(cfg: RunConfig | None) -> str:
    """The intermediate-loss layer subset, e.g. ``1,2,3,4``; ``-`` without an intermediate loss."""
    if cfg is None:
        return "?"
    return "-" if cfg.loss.type == "none" else ",".join(map(str, cfg.loss.blocks))


def table(records: list[TrialRecord], sweep: Sweep) -> pd.DataFrame:
    """One row per trial: sampled keys, resolved loss settings, best/last metric, status, error."""
    metric, mode = sweep.settings.metric, sweep.settings.mode
    rows = []
    for r in records:
        values = metric_values(r, metric)
        steps = metric_values(r, "step")
        rows.append(
            {
                "trial_id": r.trial_id,
                "status": r.status,
                **{key: _cell(value) for key, value in r.sampled.items()},
                "loss.type": r.cfg.loss.type if r.cfg else None,
                "layers": layer_label(r.cfg),
                "loss.weights": _cell(r.cfg.loss.weights) if r.cfg else None,
                "steps": int(steps.max()) if not steps.empty else 0,
                "reports": len(values),
                f"best_{metric}": best_value(r, metric, mode),
                f"last_{metric}": float(values.iloc[-1]) if not values.empty else None,
                "error": r.error,
                "run_dir": str(sweep.trials_dir / r.trial_id),
            }
        )
    df = pd.DataFrame(rows)
    return df.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last", kind="stable")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "[" + ", ".join(str(_cell(v)) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else value


def best(records: list[TrialRecord], sweep: Sweep) -> TrialRecord | None:
    """The trial with the best metric over its reports (errored trials excluded)."""
    scored = [
        (best_value(r, sweep.settings.metric, sweep.settings.mode), r) for r in records if r.status != "error"
    ]
    scored = [(v, r) for v, r in scored if v is not None and r.cfg is not None]
    if not scored:
        return None
    sign = 1 if sweep.settings.mode == "max" else -1
    return max(scored, key=lambda item: sign * item[0])[1]


def export_best(record: TrialRecord, sweep: Sweep, path: Path) -> RunConfig:
    """Write the best trial's run config, writing to ``runs/<sweep name>/best``, as a normal run config."""
    name = sweep.settings.name
    cfg = sweep.run_config(record.sampled, Path("runs") / name / "best", f"{name}_best")
    save_config(cfg, path)
    value = best_value(record, sweep.settings.metric, sweep.settings.mode)
    header = f"# best trial {record.trial_id} of sweep {name}: {sweep.settings.metric} = {value:.4f}\n"
    path.write_text(header + path.read_text())
    return cfg


def loss_styles(types: list[str]) -> dict[str, tuple[str, float]]:
    """Colour and x offset per loss type: ``none`` grey in the middle, the others spread around it.

    ``types``: the registered types first, then any other type found in the results, so none is hidden.
    """
    others = [t for t in types if t != NO_LOSS]
    step = min(0.16, 0.7 / max(1, len(others)))
    colours = [f"C{i}" for i in range(10) if i != 7]  # C7 (grey) is for none
    styles = {NO_LOSS: ("C7", 0.0)}
    for i, loss_type in enumerate(others):
        styles[loss_type] = (colours[i % len(colours)], step * (i - (len(others) - 1) / 2))
    return styles


def plot(df: pd.DataFrame, sweep: Sweep, path: Path) -> list[str]:
    """Best metric per trial by layer subset (x) and loss type (colour); hollow: stopped early.

    Returns the loss types shown (every type with a result, registered or not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metric = sweep.settings.metric
    ok = df[(df["status"] != "error") & df[f"best_{metric}"].notna()]
    layers = sorted(ok["layers"].unique(), key=lambda s: (s != "-", len(s), s))
    found = [t for t in ok["loss.type"].unique() if t not in loss_types()]
    styles = loss_styles([*loss_types(), *sorted(found)])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(layers) + 2), 4))
    for loss_type, (colour, offset) in styles.items():
        sub = ok[ok["loss.type"] == loss_type]
        if sub.empty:
            continue
        ax.scatter(
            [layers.index(x) + offset for x in sub["layers"]],
            sub[f"best_{metric}"],
            edgecolors=colour,
            facecolors=["none" if s == "stopped" else colour for s in sub["status"]],
            s=40,
        )
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer subset (loss.blocks; '-': no intermediate loss)")
    ax.set_ylabel(f"best {metric}")
    failed = int((df["status"] == "error").sum())
    ax.set_title(
        f"sweep {sweep.settings.name}: {len(ok)} trials with results, {failed} failed (hollow: stopped early)",
        fontsize=9,
    )
    shown = [t for t in styles if (ok["loss.type"] == t).any()]
    handles = [Line2D([], [], marker="o", ls="", color=styles[t][0], label=t) for t in shown]
    ax.legend(handles=handles, title="loss.type", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return shown

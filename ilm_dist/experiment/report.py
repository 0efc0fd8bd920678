"""The experiment's report: the paired differences first, then means over seeds, probes, CKA, KS and plots.

Files in ``<output_dir>/report/``: ``report.md``, ``summary.json`` (``{"dataset", "seeds", "comparisons":
[{"a", "b", "eval", "fraction", "metric", "diff", "ci"}]}``, one entry per compared pair, evaluation and
fraction, ``eval`` one of ``linear``, ``full``, ``probe_block4``), ``differences.csv``, ``per_seed.csv``
(every number of every method and seed, long format) and ``differences.png``, ``finetune.png``,
``probe.png``, ``cka.png``, ``ks.png``. Everything is read from the saved results of the evaluation
commands (:mod:`ilm_dist.eval.analysis` loads them, CKA is read from the analyse cells' ``cka.json``); a
comparison is reported only when both methods have the result for every seed, the others are listed as
missing with the cells that failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes

from ilm_dist.eval.analysis import load_method, summarise
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.metrics import check_metric
from ilm_dist.eval.probe import PREDICTIONS
from ilm_dist.eval.report import md_table, new_figure, pct, save_figure, share_legend_and_labels, write_csv
from ilm_dist.eval.store import finetune_dir, load_npz, probe_result_dir, read_json, write_json
from ilm_dist.experiment.cells import cell_id, cka_params
from ilm_dist.experiment.config import FINETUNE_MODES, Experiment
from ilm_dist.experiment.state import State
from ilm_dist.experiment.stats import Resamples, Scores, over_seeds, paired_difference, score

PROBE_EVAL = "probe_block4"  # the probe compared in the table: the last block, as the paper's linear probe
BLOCKS = ("block1", "block2", "block3", "block4")


@dataclass
class Results:
    """What the saved results of an experiment hold, by (method, eval, fraction) and seed."""

    probs: dict[tuple[str, str, float], dict[int, np.ndarray]] = field(default_factory=dict)
    labels: np.ndarray | None = None
    labels_from: str = ""
    probe: dict[tuple[str, float], dict[int, dict[str, float]]] = field(default_factory=dict)  # -> block
    cka: dict[tuple[str, float], dict[int, dict[str, dict]]] = field(default_factory=dict)  # -> block
    ks: dict[tuple[str, str, float], dict[int, float]] = field(default_factory=dict)

    def add_predictions(
        self, key: tuple[str, str, float], seed: int, probs: np.ndarray, labels: np.ndarray, source: Path
    ) -> None:
        if self.labels is None:
            self.labels, self.labels_from = labels, str(source)
        elif not np.array_equal(self.labels, labels):
            raise EvalError(
                f"{source}: test labels differ from those of {self.labels_from}; every result of an "
                "experiment must come from the same test split"
            )
        self.probs.setdefault(key, {})[seed] = probs


def evaluations_compared(exp: Experiment) -> list[tuple[str, tuple[float, ...]]]:
    """The compared evaluations and their fractions: linear, full, then the block-4 probe."""
    found = [(mode, exp.evaluations[mode].fractions) for mode in FINETUNE_MODES if mode in exp.evaluations]
    if "probe" in exp.evaluations:
        found.append((PROBE_EVAL, exp.evaluations["probe"].fractions))
    return found


def reported_metric(exp: Experiment, evaluation: str) -> str:
    """The test metric an evaluation reports (``report`` of its settings: the protocol's, or the
    experiment's over it; default the task's primary metric)."""
    kind = "probe" if evaluation == PROBE_EVAL else evaluation
    section = "probe" if kind == "probe" else "finetune"
    report = exp.protocol.settings(section, exp.evaluations[kind].settings).report
    return check_metric(report, exp.manifest.task, f"evaluations.{kind}.report")


def collect(exp: Experiment, state: State) -> Results:
    """Read every saved result of the experiment's methods and seeds (those whose cells are done)."""
    results = Results()
    for seed in exp.seeds:
        for name in exp.methods:
            method_dir = exp.method_dir(name, seed)
            for mode in (m for m in FINETUNE_MODES if m in exp.evaluations):
                if state.status(cell_id(seed, name, mode)) != "done":
                    continue
                for fraction in exp.evaluations[mode].fractions:
                    path = finetune_dir(method_dir, mode, fraction) / "predictions.npz"
                    saved = load_npz(path)
                    results.add_predictions(
                        (name, mode, fraction), seed, saved["probs"], saved["labels"], path
                    )
            if "probe" in exp.evaluations:
                _collect_probe(exp, results, name, seed, reported_metric(exp, PROBE_EVAL))
            if "analyse" in exp.evaluations and state.status(cell_id(seed, name, "analyse")) == "done":
                _collect_analysis(exp, results, name, seed)
    return results


def _collect_probe(exp: Experiment, results: Results, name: str, seed: int, metric: str) -> None:
    for fraction in exp.evaluations["probe"].fractions:
        result = probe_result_dir(exp.method_dir(name, seed), fraction)
        if not (result / PREDICTIONS).is_file() or not (result / "metrics.json").is_file():
            continue
        saved = load_npz(result / PREDICTIONS)
        results.add_predictions(
            (name, PROBE_EVAL, fraction), seed, saved["block4_probs"], saved["labels"], result
        )
        blocks = read_json(result / "metrics.json")["blocks"]
        results.probe.setdefault((name, fraction), {})[seed] = {
            b: r["metrics"][metric] for b, r in blocks.items()
        }


def _collect_analysis(exp: Experiment, results: Results, name: str, seed: int) -> None:
    """CKA (cached by the analyse cell; nothing is recomputed) and KS of one method and seed."""
    summary = summarise([load_method(exp.method_dir(name, seed))], cka_params(exp))
    for (_, fraction), blocks in summary["cka"].items():
        results.cka.setdefault((name, fraction), {})[seed] = blocks
    for (_, mode, fraction), ks in summary["ks"].items():
        results.ks.setdefault((name, mode, fraction), {})[seed] = ks["mean_statistic"]


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    eval: str
    fraction: float
    metric: str
    diff: float
    ci: tuple[float, float]

    def summary(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "eval": self.eval,
            "fraction": self.fraction,
            "metric": self.metric,
            "diff": self.diff,
            "ci": list(self.ci),
        }


def compare(exp: Experiment, results: Results) -> tuple[list[Comparison], list[str], dict]:
    """The paired differences that have every seed on both sides, what is missing, and each method's
    scores ``{(method, eval, fraction): Scores}``."""
    task = exp.manifest.task
    scores: dict[tuple[str, str, float], Scores] = {}
    if results.labels is None:
        return [], ["no saved test predictions yet"], scores
    resamples = Resamples.draw(
        len(results.labels), len(exp.seeds), exp.settings.report.n_boot, exp.settings.report.seed
    )
    for key, by_seed in results.probs.items():
        if set(by_seed) == set(exp.seeds):
            probs = [by_seed[s] for s in exp.seeds]
            metric = reported_metric(exp, key[1])
            scores[key] = score(task, results.labels, probs, exp.manifest.class_names, metric, resamples)
    comparisons, missing = [], []
    for evaluation, fractions in evaluations_compared(exp):
        metric = reported_metric(exp, evaluation)
        for fraction in fractions:
            for a, b in exp.comparisons:
                ka, kb = (a, evaluation, fraction), (b, evaluation, fraction)
                if ka in scores and kb in scores:
                    d = paired_difference(scores[ka], scores[kb], resamples)
                    comparisons.append(Comparison(a, b, evaluation, fraction, metric, d.diff, d.ci))
                else:
                    missing.append(
                        f"{a} - {b}, {evaluation} at {pct(fraction)}: results missing for some seeds"
                    )
    return comparisons, missing, scores


# --------------------------------------------------------------------------- writing


def title(exp: Experiment, evaluation: str) -> str:
    name = "block-4 probe" if evaluation == PROBE_EVAL else f"{evaluation} fine-tuning"
    return f"{name}, test {reported_metric(exp, evaluation)}"


def signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def diff_cell(c: Comparison) -> str:
    text = f"{signed(c.diff)} [{signed(c.ci[0])}, {signed(c.ci[1])}]"
    return f"**{text}**" if c.ci[0] > 0 or c.ci[1] < 0 else text


def mean_cell(values: Iterable[float]) -> str:
    s = over_seeds(list(values))
    if s.n < 2:
        return f"{s.mean:.3f}"
    return f"{s.mean:.3f} [{s.ci[0]:.3f}, {s.ci[1]:.3f}]"


def spread_cell(values: Iterable[float]) -> str:
    s = over_seeds(list(values))
    return f"{s.mean:.3f}" if s.n < 2 else f"{s.mean:.3f} ± {s.std:.3f}"


def differences_section(exp: Experiment, comparisons: list[Comparison], missing: list[str]) -> str:
    n_boot = exp.settings.report.n_boot
    parts = [
        "## Paired differences (test metric, method a minus method b)\n\n"
        f"Each cell: the mean over the {len(exp.seeds)} seed(s) of the difference on the same test images, "
        f"fine-tuned (or probed) on the same label subsets, with its 95% interval from a two-level bootstrap "
        f"({n_boot} resamples of the seeds and of the test images, the same images for both methods and every "
        f"seed of a resample; seed {exp.settings.report.seed}). **Bold**: the interval excludes 0.\n"
    ]
    for evaluation, fractions in evaluations_compared(exp):
        rows = []
        for a, b in exp.comparisons:
            found = {c.fraction: c for c in comparisons if (c.a, c.b, c.eval) == (a, b, evaluation)}
            rows.append(
                [f"{a} − {b}", *(diff_cell(found[f]) if f in found else "missing" for f in fractions)]
            )
        parts.append(
            f"**{title(exp, evaluation)}**\n\n" + md_table(["pair", *map(pct, fractions)], rows) + "\n"
        )
    if missing:
        parts.append("Not compared: " + "; ".join(missing) + ".\n")
    parts.append("![paired differences](differences.png)\n")
    return "\n".join(parts)


def means_section(exp: Experiment, scores: dict) -> str:
    parts = ["## Test metric per method (mean over seeds, 95% Student-t interval over seeds)\n"]
    for evaluation, fractions in evaluations_compared(exp):
        rows = [
            [
                name,
                *(
                    mean_cell(scores[(name, evaluation, f)].full)
                    if (name, evaluation, f) in scores
                    else "missing"
                    for f in fractions
                ),
            ]
            for name in exp.methods
        ]
        parts.append(
            f"**{title(exp, evaluation)}**\n\n" + md_table(["method", *map(pct, fractions)], rows) + "\n"
        )
    parts.append("![metric per label fraction](finetune.png)\n")
    return "\n".join(parts)


def probe_section(exp: Experiment, results: Results) -> str:
    metric = reported_metric(exp, PROBE_EVAL)
    parts = [f"## Per-block probe (frozen backbone, test {metric}, mean ± sd over seeds)\n"]
    for fraction in exp.evaluations["probe"].fractions:
        rows = []
        for name in exp.methods:
            by_seed = results.probe.get((name, fraction), {})
            rows.append(
                [
                    name,
                    *(spread_cell(v[b] for v in by_seed.values()) if by_seed else "missing" for b in BLOCKS),
                ]
            )
        parts.append(f"**{pct(fraction)} labels**\n\n" + md_table(["method", *BLOCKS], rows) + "\n")
    parts.append("![probe per block](probe.png)\n")
    return "\n".join(parts)


def cka_section(exp: Experiment, results: Results) -> str:
    parts = [
        "## CKA per block before vs after full fine-tuning (test split, mean ± sd over seeds)\n\n"
        "Cells: linear CKA / RBF CKA (see each method's analysis report for the RBF settings).\n"
    ]
    for fraction in sorted({f for _, f in results.cka}):
        rows = []
        for name in exp.methods:
            by_seed = results.cka.get((name, fraction), {})
            cells = [
                f"{spread_cell(v[b]['linear'] for v in by_seed.values())} / "
                f"{spread_cell(v[b]['rbf_mean'] for v in by_seed.values())}"
                if by_seed
                else "missing"
                for b in BLOCKS
            ]
            rows.append([name, *cells])
        parts.append(f"**{pct(fraction)} labels**\n\n" + md_table(["method", *BLOCKS], rows) + "\n")
    parts.append("![CKA per block](cka.png)\n")
    return "\n".join(parts)


def ks_section(exp: Experiment, results: Results) -> str:
    groups = sorted({(mode, f) for _, mode, f in results.ks})
    rows = [
        [
            name,
            *(
                spread_cell(results.ks[(name, m, f)].values()) if (name, m, f) in results.ks else "missing"
                for m, f in groups
            ),
        ]
        for name in exp.methods
    ]
    return (
        "## Kolmogorov-Smirnov distance to the 100%-label model (test probabilities, mean ± sd over seeds)\n\n"
        + md_table(["method", *(f"{m} {pct(f)}" for m, f in groups)], rows)
        + "\n\n![KS](ks.png)\n"
    )


def cells_section(state: State) -> str:
    counts = state.counts()
    lines = ["## Cells\n\n" + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + ".\n"]
    for cell, record in state.cells.items():
        if record["status"] != "done":
            lines.append(
                f"- `{cell}`: {record['status']}" + (f": {record['error']}" if record["error"] else "")
            )
    return "\n".join(lines) + "\n"


def write_report(exp: Experiment, state: State) -> Path:
    """Write the report directory from the saved results; returns the path of ``report.md``."""
    out = exp.report_dir
    out.mkdir(parents=True, exist_ok=True)
    results = collect(exp, state)
    comparisons, missing, scores = compare(exp, results)
    write_json(
        out / "summary.json",
        {
            "dataset": exp.dataset.name,
            "seeds": len(exp.seeds),
            "comparisons": [c.summary() for c in comparisons],
        },
    )
    write_csv(out / "differences.csv", [difference_row(c) for c in comparisons])
    write_csv(out / "per_seed.csv", per_seed_rows(exp, results, scores))
    m = exp.manifest
    sections = [
        f"# Experiment {exp.name}\n\n"
        f"Dataset `{exp.dataset.name}` ({m.task}, classes {', '.join(m.class_names)}; "
        f"{m.split('test').num_samples} test images), seeds {', '.join(map(str, exp.seeds))}, methods "
        f"{', '.join(exp.methods)}; evaluation protocol {exp.protocol.name}. Experiment file `{exp.file.name}`.\n",
        differences_section(exp, comparisons, missing),
        means_section(exp, scores),
    ]
    plot_differences(exp, comparisons, out / "differences.png")
    plot_means(exp, scores, out / "finetune.png")
    if results.probe:
        sections.append(probe_section(exp, results))
        plot_probe(exp, results, out / "probe.png")
    if results.cka:
        sections.append(cka_section(exp, results))
        plot_cka(exp, results, out / "cka.png")
    if results.ks:
        sections.append(ks_section(exp, results))
        plot_ks(exp, results, out / "ks.png")
    sections.append(cells_section(state))
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path


def difference_row(c: Comparison) -> dict:
    row = {k: v for k, v in c.summary().items() if k != "ci"}
    return row | {"ci_low": c.ci[0], "ci_high": c.ci[1]}


def per_seed_rows(exp: Experiment, results: Results, scores: dict) -> list[dict]:
    rows = [
        {
            "method": name,
            "eval": ev,
            "fraction": f,
            "block": "",
            "seed": seed,
            "quantity": reported_metric(exp, ev),
            "value": value,
        }
        for (name, ev, f), s in sorted(scores.items())
        for seed, value in zip(exp.seeds, s.full.tolist(), strict=True)
    ]
    rows += [
        {
            "method": name,
            "eval": "probe",
            "fraction": f,
            "block": b,
            "seed": seed,
            "quantity": reported_metric(exp, PROBE_EVAL),
            "value": v,
        }
        for (name, f), by_seed in sorted(results.probe.items())
        for seed, blocks in sorted(by_seed.items())
        for b, v in blocks.items()
    ]
    rows += [
        {
            "method": name,
            "eval": "full",
            "fraction": f,
            "block": b,
            "seed": seed,
            "quantity": f"cka_{q}",
            "value": v[q],
        }
        for (name, f), by_seed in sorted(results.cka.items())
        for seed, blocks in sorted(by_seed.items())
        for b, v in blocks.items()
        for q in ("linear", "rbf_mean")
    ]
    rows += [
        {"method": name, "eval": mode, "fraction": f, "block": "", "seed": seed, "quantity": "ks", "value": v}
        for (name, mode, f), by_seed in sorted(results.ks.items())
        for seed, v in sorted(by_seed.items())
    ]
    return rows


# --------------------------------------------------------------------------- plots


def plot_differences(exp: Experiment, comparisons: list[Comparison], path: Path) -> None:
    def draw(ax: Axes, evaluation: str, fractions: tuple[float, ...]) -> None:
        width = 0.8 / max(1, len(exp.comparisons))
        for i, (a, b) in enumerate(exp.comparisons):
            found = [c for c in comparisons if (c.a, c.b, c.eval) == (a, b, evaluation)]
            xs = [fractions.index(c.fraction) + (i - (len(exp.comparisons) - 1) / 2) * width for c in found]
            ys = [c.diff for c in found]
            errs = [[c.diff - c.ci[0] for c in found], [c.ci[1] - c.diff for c in found]]
            ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=f"{a} − {b}")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(fractions)), [pct(f) for f in fractions])

    _evaluation_panels(exp, "Δ test", draw, path)


def plot_means(exp: Experiment, scores: dict, path: Path) -> None:
    def draw(ax: Axes, evaluation: str, fractions: tuple[float, ...]) -> None:
        for name in exp.methods:
            xs = [f for f in fractions if (name, evaluation, f) in scores]
            summaries = [over_seeds(scores[(name, evaluation, f)].full) for f in xs]
            ax.plot(xs, [s.mean for s in summaries], marker="o", label=name)
            if summaries and summaries[0].n > 1:
                ax.fill_between(xs, [s.ci[0] for s in summaries], [s.ci[1] for s in summaries], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks(list(fractions), [pct(f) for f in fractions])
        ax.minorticks_off()

    _evaluation_panels(exp, "test", draw, path)


def _evaluation_panels(
    exp: Experiment, ylabel: str, draw: Callable[[Axes, str, tuple[float, ...]], None], path: Path
) -> None:
    """One panel per compared evaluation over its labelled fractions, ``draw(ax, evaluation, fractions)``
    drawing its data; the y axis is ``ylabel`` and the evaluation's reported metric."""
    compared = evaluations_compared(exp)
    fig, axes = new_figure(max(1, len(compared)))
    for ax, (evaluation, fractions) in zip(axes[0], compared, strict=False):
        draw(ax, evaluation, fractions)
        ax.set(
            xlabel="labelled fraction of train",
            ylabel=f"{ylabel} {reported_metric(exp, evaluation)}",
            title=evaluation,
        )
    share_legend_and_labels(list(axes[0]))
    save_figure(fig, path)


def _block_panels(
    exp: Experiment, data: dict, fractions: list[float], value, ylabel: str, path: Path
) -> None:
    """One panel per fraction: per method, ``value(seed record, block)`` per block, mean ± sd over seeds."""
    fig, axes = new_figure(max(1, len(fractions)))
    for ax, fraction in zip(axes[0], fractions, strict=False):
        for name in exp.methods:
            by_seed = data.get((name, fraction))
            if not by_seed:
                continue
            summaries = [over_seeds([value(v, b) for v in by_seed.values()]) for b in BLOCKS]
            errs = [0 if math.isnan(s.std) else s.std for s in summaries]
            ax.errorbar(
                range(1, 5), [s.mean for s in summaries], yerr=errs, marker="o", capsize=3, label=name
            )
        ax.set(xlabel="block", ylabel=ylabel, title=f"{pct(fraction)} labels", xticks=[1, 2, 3, 4])
    share_legend_and_labels(list(axes[0]))
    save_figure(fig, path)


def plot_probe(exp: Experiment, results: Results, path: Path) -> None:
    metric = reported_metric(exp, PROBE_EVAL)
    _block_panels(
        exp,
        results.probe,
        list(exp.evaluations["probe"].fractions),
        lambda v, b: v[b],
        f"probe test {metric}",
        path,
    )


def plot_cka(exp: Experiment, results: Results, path: Path) -> None:
    fractions = sorted({f for _, f in results.cka})
    _block_panels(
        exp, results.cka, fractions, lambda v, b: v[b]["linear"], "linear CKA, before vs after", path
    )


def plot_ks(exp: Experiment, results: Results, path: Path) -> None:
    groups = sorted({(mode, f) for _, mode, f in results.ks})
    fig, axes = new_figure(1)
    ax, width = axes[0][0], 0.8 / max(len(exp.methods), 1)
    for i, name in enumerate(exp.methods):
        summaries = [
            over_seeds(list(results.ks[(name, m, f)].values())) if (name, m, f) in results.ks else None
            for m, f in groups
        ]
        means = [s.mean if s else math.nan for s in summaries]
        errs = [0 if s is None or math.isnan(s.std) else s.std for s in summaries]
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(
        [g + width * (len(exp.methods) - 1) / 2 for g in range(len(groups))],
        [f"{m} {pct(f)}" for m, f in groups],
    )
    ax.set(ylabel="KS statistic vs 100% labels", title="output shift (mean over classes)")
    share_legend_and_labels([ax])
    save_figure(fig, path)

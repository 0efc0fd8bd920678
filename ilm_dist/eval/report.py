"""The analysis report: CSV tables, PNG plots (matplotlib Agg) and a Markdown page that shows them.

Files in the report directory: ``report.md``, ``finetune.csv``, ``probe.csv``, ``cka.csv``, ``ks.csv``,
``finetune.png`` (metric vs label fraction), ``probe.png`` (metric per block), ``cka.png`` (CKA per
block before vs after fine-tuning), ``ks.png`` (KS per method). The page and every CSV row name the
evaluation protocol that produced the numbers (one per report: the analysis refuses to mix them), the
headline metric (the protocol's ``report``), the selection metric and the interval style.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from ilm_dist.eval.analysis import MethodResults
from ilm_dist.eval.settings import CkaParams

DPI = 90


def pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def interval(record: dict, name: str) -> tuple[float, float, float]:
    """``(value, low, high)``; without a bootstrap interval low = high = value."""
    value = record["metrics"][name]
    low, high = record.get("ci95", {}).get(name, [value, value])
    return value, low, high


def with_ci(record: dict, name: str) -> str:
    """``value [low, high]``, or ``value`` alone where no bootstrap computed an interval."""
    if name not in record.get("ci95", {}):
        return f"{record['metrics'][name]:.3f}"
    value, low, high = interval(record, name)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def md_table(header: list[str], rows: Iterable[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- long-format rows


def _metric_rows(record: dict, protocol: str, **keys) -> list[dict]:
    ci = record.get("ci95", {})
    return [
        {
            **keys,
            "protocol": protocol,
            "metric": name,
            "value": value,
            "ci95_low": ci.get(name, [None])[0],
            "ci95_high": ci.get(name, [None, None])[1],
        }
        for name, value in record["metrics"].items()
    ]


def finetune_rows(methods: list[MethodResults]) -> list[dict]:
    return [
        row
        for m in methods
        for (mode, fraction), rec in sorted(m.finetune.items())
        for row in _metric_rows(
            rec,
            m.protocol["name"],
            method=m.name,
            mode=mode,
            fraction=fraction,
            labelled=rec["subset"]["num_samples"],
        )
    ]


def probe_rows(methods: list[MethodResults]) -> list[dict]:
    return [
        row
        for m in methods
        for fraction, rec in sorted(m.probe.items())
        for block, result in rec["blocks"].items()
        for row in _metric_rows(result, m.protocol["name"], method=m.name, fraction=fraction, block=block)
    ]


def cka_rows(cka: dict) -> list[dict]:
    return [
        {"method": name, "fraction": fraction, "block": block, **values}
        for (name, fraction), blocks in sorted(cka.items())
        for block, values in blocks.items()
    ]


def ks_rows(ks: dict) -> list[dict]:
    return [
        {"method": name, "mode": mode, "fraction": fraction, "class": cls, **values}
        for (name, mode, fraction), result in sorted(ks.items())
        for cls, values in result["per_class"].items()
    ]


# --------------------------------------------------------------------------- plots


def new_figure(ncols: int, nrows: int = 1) -> tuple[Figure, list]:
    """A figure without pyplot (no global state); PNGs are rendered by the Agg canvas."""
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def share_legend_and_labels(axes: list) -> None:
    """Panels side by side show the same series: one legend (in the last panel, every series once; none
    where no panel has results) and a y label only where it differs from the one on its left."""
    ylabels = [ax.get_ylabel() for ax in axes]
    for ax, ylabel, left in zip(axes[1:], ylabels[1:], ylabels, strict=False):
        if ylabel == left:
            ax.set_ylabel("")
    series = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            series.setdefault(label, handle)
    if series:
        axes[-1].legend(list(series.values()), list(series), fontsize=7)


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def headline(records: Iterable[dict]) -> str:
    """The reported metric of comparable results (the same settings, so the same for all)."""
    return next(iter(records))["primary"]


def intervals_text(settings: dict) -> str:
    """How the 95% intervals were made (``settings["ci"]``)."""
    n_boot = settings["n_boot"]
    if not n_boot:
        return "no bootstrap intervals (0 resamples)"
    if settings.get("ci", "percentile") == "official":
        return (
            f"the official style, bootstrap mean ± 1.96·std/√{n_boot} over {n_boot} resamples of the test "
            "split (an interval for the bootstrap mean; multi-label: std over every finding's AUCs)"
        )
    return f"2.5/97.5 percentiles over {n_boot} resamples of the test split"


def plot_finetune(methods: list[MethodResults], path: Path) -> None:
    modes = sorted({mode for m in methods for mode, _ in m.finetune})
    fig, axes = new_figure(len(modes))
    metric = headline(methods[0].finetune.values())
    for ax, mode in zip(axes[0], modes, strict=True):
        for m in methods:
            xs = sorted(f for md, f in m.finetune if md == mode)
            ys, lo, hi = zip(*(interval(m.finetune[(mode, f)], metric) for f in xs), strict=True)
            ax.plot(xs, ys, marker="o", label=m.name)
            ax.fill_between(xs, lo, hi, alpha=0.15)
        fractions = sorted({f for m in methods for md, f in m.finetune if md == mode})
        ax.set_xscale("log")
        ax.set_xticks(fractions, [pct(f) for f in fractions])
        ax.minorticks_off()
        ax.set(
            xlabel="labelled fraction of train",
            ylabel=f"test {metric}",
            title=f"{mode} fine-tuning",
        )
    share_legend_and_labels(list(axes[0]))
    save_figure(fig, path)


def plot_probe(methods: list[MethodResults], path: Path) -> None:
    fractions = sorted({f for m in methods for f in m.probe})
    fig, axes = new_figure(len(fractions))
    metric = headline(next(iter(methods[0].probe.values()))["blocks"].values())
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for m in methods:
            ys, lo, hi = zip(
                *(interval(b, metric) for b in m.probe[fraction]["blocks"].values()), strict=True
            )
            errs = [
                [y - low for y, low in zip(ys, lo, strict=True)],
                [h - y for y, h in zip(ys, hi, strict=True)],
            ]
            ax.errorbar(range(1, len(ys) + 1), ys, yerr=errs, marker="o", capsize=3, label=m.name)
        ax.set(
            xlabel="block",
            ylabel=f"test {metric}",
            title=f"linear probe ({pct(fraction)} labels)",
            xticks=[1, 2, 3, 4],
        )
    share_legend_and_labels(list(axes[0]))
    save_figure(fig, path)


def plot_cka(cka: dict, path: Path) -> None:
    fractions = sorted({f for _, f in cka})
    fig, axes = new_figure(len(fractions), 2)
    for col, fraction in enumerate(fractions):
        for row, (key, label) in enumerate((("linear", "linear CKA"), ("rbf_mean", "RBF CKA"))):
            ax = axes[row][col]
            for (name, f), blocks in sorted(cka.items()):
                if f == fraction:
                    ax.plot(
                        range(1, len(blocks) + 1), [b[key] for b in blocks.values()], marker="o", label=name
                    )
            ax.set(
                xlabel="block",
                ylabel=label,
                title=f"before vs after ({pct(fraction)} labels)",
                xticks=[1, 2, 3, 4],
            )
    for row in axes:  # linear CKA above, RBF CKA below
        share_legend_and_labels(list(row))
    save_figure(fig, path)


def plot_ks(ks: dict, path: Path) -> None:
    groups = sorted({(mode, f) for _, mode, f in ks})
    names = sorted({name for name, _, _ in ks})
    fig, axes = new_figure(1)
    ax, width = axes[0][0], 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [ks.get((name, mode, f), {}).get("mean_statistic", float("nan")) for mode, f in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(
        [g + width * (len(names) - 1) / 2 for g in range(len(groups))],
        [f"{mode} {pct(f)}" for mode, f in groups],
    )
    ax.set(ylabel="KS statistic vs 100% labels", title="output shift (mean over classes)")
    share_legend_and_labels([ax])
    save_figure(fig, path)


# --------------------------------------------------------------------------- markdown


def finetune_section(methods: list[MethodResults]) -> str:
    first = next(iter(methods[0].finetune.values()))
    metric, settings = first["primary"], first["settings"]
    title = f"test {metric}, 95% bootstrap CI" if settings["n_boot"] else f"test {metric}, no intervals"
    parts = [
        f"## Fine-tuning ({title})\n\n"
        f"Intervals: {intervals_text(settings)} (seed {settings['seed']}). The model tested is the best on "
        f"val by {first.get('selected_by', metric)}. Labelled images per fraction are the same for every method.\n"
    ]
    for mode in sorted({mode for m in methods for mode, _ in m.finetune}):
        fractions = sorted({f for m in methods for md, f in m.finetune if md == mode})
        rows = [[m.name, *(with_ci(m.finetune[(mode, f)], metric) for f in fractions)] for m in methods]
        parts.append(f"**{mode}**\n\n" + md_table(["method", *map(pct, fractions)], rows) + "\n")
    names = [k for k in next(iter(methods[0].finetune.values()))["metrics"] if "/" not in k]
    rows = [
        [m.name, mode, pct(f), rec["subset"]["num_samples"], *(with_ci(rec, n) for n in names)]
        for m in methods
        for (mode, f), rec in sorted(m.finetune.items())
    ]
    parts.append("All metrics:\n\n" + md_table(["method", "mode", "labels", "images", *names], rows))
    parts.append("\n![metric vs label fraction](finetune.png)\n")
    return "\n".join(parts)


def probe_section(methods: list[MethodResults]) -> str:
    first = next(iter(methods[0].probe.values()))
    block = next(iter(first["blocks"].values()))
    metric, settings = block["primary"], first["settings"]
    features = (
        f"features of the network run at every step (BatchNorm {settings.get('frozen_bn', 'eval')} mode, "
        f"training views {settings.get('train_aug', 'none')})"
        if settings.get("frozen_bn") == "train" or settings.get("train_aug", "none") != "none"
        else "features cached once in eval mode"
        + (", standardised" if settings.get("standardise", True) else ", raw")
    )
    parts = [
        f"## Layer-wise probing (frozen backbone, test {metric})\n\n"
        f"Linear heads on the pooled block outputs: {features}; selected on val by "
        f"{block.get('selected_by', metric)}; intervals: {intervals_text(settings)}.\n"
    ]
    for fraction in sorted({f for m in methods for f in m.probe}):
        rows = [
            [m.name, *(with_ci(b, metric) for b in m.probe[fraction]["blocks"].values())] for m in methods
        ]
        parts.append(
            f"**{pct(fraction)} labels**\n\n"
            + md_table(["method", "Block 1", "Block 2", "Block 3", "Block 4"], rows)
            + "\n"
        )
    parts.append("![probe metric per block](probe.png)\n")
    return "\n".join(parts)


def cka_cell(block: dict) -> str:
    spread = f"±{block['rbf_std']:.3f}" if block["rbf_subsets"] > 1 else ""
    return f"{block['linear']:.3f} / {block['rbf_mean']:.3f}{spread}"


def cka_section(cka: dict, params: CkaParams) -> str:
    sigma = f"{params.sigma} x median distance" if params.relative else f"{params.sigma} (absolute)"
    first = next(iter(next(iter(cka.values())).values()))
    if first["rbf_subsets"] > 1:
        rbf = f"mean±std over {first['rbf_subsets']} random subsets of {first['rbf_subset_size']} images"
    else:
        rbf = f"the {first['rbf_subset_size']} test images at once, fewer than the subset size {params.subset_size}"
    rows = [[name, pct(f), *map(cka_cell, blocks.values())] for (name, f), blocks in sorted(cka.items())]
    return (
        "## Feature reuse: CKA before vs after full fine-tuning (test split)\n\n"
        f"Cells: linear CKA (all test images) / RBF CKA (sigma {sigma}; {rbf}).\n\n"
        + md_table(["method", "labels", "Block 1", "Block 2", "Block 3", "Block 4"], rows)
        + "\n\n![CKA per block](cka.png)\n"
    )


def ks_section(ks: dict) -> str:
    rows = [[name, mode, pct(f), f"{r['mean_statistic']:.3f}"] for (name, mode, f), r in sorted(ks.items())]
    return (
        "## Kolmogorov-Smirnov distance to the 100%-label model (test probabilities)\n\n"
        + md_table(["method", "mode", "labels", "KS (mean over classes)"], rows)
        + "\n\n![KS per method](ks.png)\n"
    )


def protocol_section(methods: list[MethodResults], params: CkaParams) -> str:
    """Which protocol produced every number, and the settings given over it on the command line."""
    protocol = methods[0].protocol
    runs = [("finetune", r["settings"], "mode") for r in methods[0].finetune.values()]
    runs += [("probe", r["settings"], "fraction") for r in methods[0].probe.values()]
    runs.append(("cka", asdict(params), None))
    changed = sorted(
        {
            f"{section} {key}={value!r}"
            for section, settings, result_key in runs
            for key, value in settings.items()
            if key != result_key and protocol[section].get(key) != value
        }
    )
    dataset = f", dataset `{protocol['dataset']}`" if protocol["dataset"] else ""
    return (
        f"Every number below comes from the evaluation protocol `{protocol['name']}`{dataset} (digest "
        f"`{protocol['digest']}`, {protocol['source']}; inputs {protocol['inputs']})"
        + (f", with these settings given over it: {', '.join(changed)}." if changed else ".")
        + "\n"
    )


def write_report(methods: list[MethodResults], summary: dict, out: Path, params: CkaParams) -> Path:
    """Write CSVs, PNGs and ``report.md`` into ``out``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    source = methods[0].source
    task = source["task"]
    sections = [
        f"# Evaluation report: {', '.join(m.name for m in methods)}\n\n"
        f"Data: `{source['data']}` ({task}, classes {', '.join(source['class_names'])}), image size "
        f"{source['image_size']}. Method directories: {', '.join(f'`{m.path}`' for m in methods)}.\n",
        protocol_section(methods, params),
    ]
    if any(m.finetune for m in methods):
        write_csv(out / "finetune.csv", finetune_rows(methods))
        plot_finetune(methods, out / "finetune.png")
        sections.append(finetune_section(methods))
    if any(m.probe for m in methods):
        write_csv(out / "probe.csv", probe_rows(methods))
        plot_probe(methods, out / "probe.png")
        sections.append(probe_section(methods))
    if summary["cka"]:
        write_csv(out / "cka.csv", cka_rows(summary["cka"]))
        plot_cka(summary["cka"], out / "cka.png")
        sections.append(cka_section(summary["cka"], params))
    if summary["ks"]:
        write_csv(out / "ks.csv", ks_rows(summary["ks"]))
        plot_ks(summary["ks"], out / "ks.png")
        sections.append(ks_section(summary["ks"]))
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path

"""The report holds what the results hold: every file written, every method and value in the Markdown
tables (parsed back) and the CSVs, intervals only where a bootstrap computed them."""

import csv
import re

import pytest

from ilm_dist.eval.analysis import load_method
from ilm_dist.eval.report import new_figure, share_legend_and_labels, write_report
from ilm_dist.eval.settings import CkaParams
from tests.eval.method_dirs import write_method

NAMES = ("moco_mse", "imagenet", "random_init")
FRACTIONS = (0.1, 1.0)
MODES = ("full", "linear")
BLOCKS = ("block1", "block2", "block3", "block4")
PARAMS = CkaParams(num_subsets=3, subset_size=16)
FILES = [f"{kind}.{ext}" for kind in ("finetune", "probe", "cka", "ks") for ext in ("csv", "png")] + [
    "report.md"
]


def make_methods(eval_dir, n_boot: int = 200):
    return [
        load_method(
            write_method(
                eval_dir,
                name,
                modes=MODES,
                fractions=FRACTIONS,
                probe_fractions=FRACTIONS,
                n_boot=n_boot,
                seed=i,
            )
        )
        for i, name in enumerate(NAMES)
    ]


def make_summary() -> dict:
    """CKA per full fine-tuning result and KS per fraction below 100%, with distinct values."""
    cka = {
        (name, f): {
            block: {
                "linear": 0.1 * i + 0.01 * b + f / 10,
                "rbf_mean": 0.2 + 0.1 * i + 0.01 * b,
                "rbf_std": 0.001 * (b + 1),
                "rbf_subsets": 3,
                "rbf_subset_size": 16,
            }
            for b, block in enumerate(BLOCKS)
        }
        for i, name in enumerate(NAMES)
        for f in FRACTIONS
    }
    ks = {
        (name, mode, 0.1): {
            "per_class": {"malignant": {"statistic": 0.05 + 0.1 * i + 0.01 * j, "pvalue": 0.5}},
            "mean_statistic": 0.05 + 0.1 * i + 0.01 * j,
        }
        for i, name in enumerate(NAMES)
        for j, mode in enumerate(MODES)
    }
    return {"cka": cka, "ks": ks}


def md_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of a Markdown page by the last text line above it: (header, rows of cells)."""
    tables, title, lines = {}, None, text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
                i += 1
            assert set("".join(block[1])) <= {"-"}, block[1]  # the separator row
            assert all(len(row) == len(block[0]) for row in block), block
            assert title not in tables, f"two tables under {title!r}"
            tables[title] = (block[0], block[2:])
        elif lines[i].strip():
            title = lines[i].strip()
            i += 1
        else:
            i += 1
    return tables


def rows_by_method(table) -> dict[str, list[str]]:
    header, rows = table
    assert header[0] == "method"
    names = [row[0] for row in rows]
    assert len(set(names)) == len(names)
    return {row[0]: row[1:] for row in rows}


CELL = re.compile(r"^(-?\d+\.\d{3})(?: \[(-?\d+\.\d{3}), (-?\d+\.\d{3})\])?$")


def assert_cell(cell: str, record: dict, metric: str) -> None:
    """``value [low, high]`` (or ``value`` without a bootstrap) is the record's, to the 3 printed decimals."""
    match = CELL.match(cell)
    assert match, cell
    value, low, high = match.groups()
    assert float(value) == pytest.approx(record["metrics"][metric], abs=5e-4)
    if metric in record["ci95"]:
        assert (float(low), float(high)) == pytest.approx(record["ci95"][metric], abs=5e-4)
    else:
        assert low is None and high is None, f"{cell}: an interval no bootstrap computed"


def read_csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One full report (rendering its four plots is the slow part), read by the tests below."""
    tmp_path = tmp_path_factory.mktemp("analysis")
    methods = make_methods(tmp_path / "eval")
    summary = make_summary()
    path = write_report(methods, summary, tmp_path / "report", PARAMS)
    return methods, summary, path


def test_every_file_is_written(report):
    _, _, path = report
    assert path.name == "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(FILES)
    for png in path.parent.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = path.read_text()
    for png in ("finetune", "probe", "cka", "ks"):
        assert f"]({png}.png)" in text


def test_fine_tuning_tables_hold_every_method_value_and_interval(report):
    methods, _, path = report
    tables = md_tables(path.read_text())
    for mode in MODES:
        header, _ = tables[f"**{mode}**"]
        assert header == ["method", "10%", "100%"]
        rows = rows_by_method(tables[f"**{mode}**"])
        assert list(rows) == list(NAMES)
        for m in methods:
            for cell, fraction in zip(rows[m.name], FRACTIONS, strict=True):
                assert_cell(cell, m.finetune[(mode, fraction)], "auc")
    header, rows = tables["All metrics:"]
    assert header == ["method", "mode", "labels", "images", "auc", "accuracy", "f1"]
    assert len(rows) == len(NAMES) * len(MODES) * len(FRACTIONS)
    for name, mode, labels, images, *cells in rows:
        record = next(m for m in methods if m.name == name).finetune[(mode, float(labels[:-1]) / 100)]
        assert int(images) == record["subset"]["num_samples"]
        for cell, metric in zip(cells, ("auc", "accuracy", "f1"), strict=True):
            assert_cell(cell, record, metric)


def test_probe_tables_hold_every_block_of_every_method(report):
    methods, _, path = report
    tables = md_tables(path.read_text())
    for fraction, title in zip(FRACTIONS, ("**10% labels**", "**100% labels**"), strict=True):
        assert tables[title][0] == ["method", "Block 1", "Block 2", "Block 3", "Block 4"]
        rows = rows_by_method(tables[title])
        assert list(rows) == list(NAMES)
        for m in methods:
            for cell, block in zip(rows[m.name], BLOCKS, strict=True):
                assert_cell(cell, m.probe[fraction]["blocks"][block], "auc")


def test_cka_and_ks_tables_hold_the_summary(report):
    _, summary, path = report
    text = path.read_text()
    tables = md_tables(text)
    assert "sigma 0.8 x median distance; mean±std over 3 random subsets of 16 images" in text
    [(header, rows)] = [v for t, v in tables.items() if t.startswith("Cells: linear CKA")]
    assert header == ["method", "labels", "Block 1", "Block 2", "Block 3", "Block 4"]
    assert len(rows) == len(NAMES) * len(FRACTIONS)
    for name, labels, *cells in rows:
        blocks = summary["cka"][(name, float(labels[:-1]) / 100)]
        for cell, block in zip(cells, BLOCKS, strict=True):
            linear, rbf, std = re.fullmatch(r"(\d\.\d{3}) / (\d\.\d{3})±(\d\.\d{3})", cell).groups()
            assert float(linear) == pytest.approx(blocks[block]["linear"], abs=5e-4)
            assert float(rbf) == pytest.approx(blocks[block]["rbf_mean"], abs=5e-4)
            assert float(std) == pytest.approx(blocks[block]["rbf_std"], abs=5e-4)
    [(header, rows)] = [v for t, v in tables.items() if t.startswith("## Kolmogorov-Smirnov")]
    assert header == ["method", "mode", "labels", "KS (mean over classes)"]
    assert len(rows) == len(summary["ks"])
    for name, mode, labels, value in rows:
        assert labels == "10%"
        assert float(value) == pytest.approx(summary["ks"][(name, mode, 0.1)]["mean_statistic"], abs=5e-4)


def test_csvs_hold_every_value_of_every_method(report):
    methods, summary, path = report
    out = path.parent
    finetune = read_csv(out / "finetune.csv")
    assert len(finetune) == len(NAMES) * len(MODES) * len(FRACTIONS) * 3
    for row in finetune:
        record = next(m for m in methods if m.name == row["method"]).finetune[
            (row["mode"], float(row["fraction"]))
        ]
        assert float(row["value"]) == record["metrics"][row["metric"]]
        assert [float(row["ci95_low"]), float(row["ci95_high"])] == record["ci95"][row["metric"]]
        assert int(row["labelled"]) == record["subset"]["num_samples"]
    probe = read_csv(out / "probe.csv")
    assert len(probe) == len(NAMES) * len(FRACTIONS) * len(BLOCKS) * 3
    for row in probe:
        record = next(m for m in methods if m.name == row["method"]).probe[float(row["fraction"])]
        assert float(row["value"]) == record["blocks"][row["block"]]["metrics"][row["metric"]]
    cka = read_csv(out / "cka.csv")
    assert len(cka) == len(NAMES) * len(FRACTIONS) * len(BLOCKS)
    for row in cka:
        values = summary["cka"][(row["method"], float(row["fraction"]))][row["block"]]
        assert float(row["linear"]) == values["linear"] and float(row["rbf_std"]) == values["rbf_std"]
    ks = read_csv(out / "ks.csv")
    assert len(ks) == len(summary["ks"])
    for row in ks:
        key = (row["method"], row["mode"], float(row["fraction"]))
        assert float(row["statistic"]) == summary["ks"][key]["per_class"][row["class"]]["statistic"]
    for rows in (finetune, probe, cka, ks):
        assert {row["method"] for row in rows} == set(NAMES)  # no method dropped


def test_fine_tuning_without_a_bootstrap_writes_its_files_and_no_intervals(tmp_path):
    methods = [
        load_method(write_method(tmp_path / "eval", name, probe_fractions=(), n_boot=0, seed=i))
        for i, name in enumerate(NAMES)
    ]
    path = write_report(methods, {"cka": {}, "ks": {}}, tmp_path / "report", PARAMS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["finetune.csv", "finetune.png", "report.md"]
    text = path.read_text()
    assert "95% bootstrap CI" not in text and "no bootstrap intervals (0 resamples)" in text
    rows = rows_by_method(md_tables(text)["**full**"])
    assert list(rows) == list(NAMES)
    for m in methods:
        for cell, fraction in zip(rows[m.name], FRACTIONS, strict=True):
            assert_cell(cell, m.finetune[("full", fraction)], "auc")
    finetune = read_csv(path.parent / "finetune.csv")
    assert {(row["ci95_low"], row["ci95_high"]) for row in finetune} == {("", "")}


def test_side_by_side_panels_share_one_legend_and_repeat_no_y_label():
    panels = list(new_figure(3)[1][0])
    for ax, (ylabel, names) in zip(
        panels, [("test auc", ["moco", "random_init"]), ("test auc", ["moco_bt"]), ("kappa", [])], strict=True
    ):
        for name in names:
            ax.plot([0, 1], [0, 1], label=name)
        ax.set_ylabel(ylabel)
    share_legend_and_labels(panels)
    assert [ax.get_ylabel() for ax in panels] == ["test auc", "", "kappa"]
    assert [ax.get_legend() is None for ax in panels] == [True, True, False]
    assert [t.get_text() for t in panels[-1].get_legend().get_texts()] == ["moco", "random_init", "moco_bt"]
    empty = list(new_figure(3)[1][0])
    for ax in empty:
        ax.set_ylabel("test auc")
    share_legend_and_labels(empty)  # no results in any panel: no legend
    assert [ax.get_ylabel() for ax in empty] == ["test auc", "", ""]
    assert all(ax.get_legend() is None for ax in empty)

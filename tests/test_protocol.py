"""docs/PROTOCOL.md and the configs agree: every checked preset value is what the dataset configs load."""

import dataclasses
import re

import pytest
import yaml

from ilm_dist.config import RunConfig, load_config, section_fields
from tests.launcher import REPO

DATASETS = ("nih", "idc", "dr")
MODELS = ("moco", "moco_mse", "moco_bt")
TICKED = re.compile(r"`([^`]+)`")
KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")


def table_rows() -> list[list[str]]:
    """The cells of every table row of docs/PROTOCOL.md (header and rule lines excluded)."""
    rows = []
    for line in (REPO / "docs/PROTOCOL.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("setting", "---"):
            rows.append(cells)
    return rows


def run_config_key(key: str) -> bool:
    """Whether ``key`` names a leaf of :class:`RunConfig` (``section.field[.field]``; loss sections included)."""
    node = RunConfig
    for part in key.split("."):
        fields = section_fields(node) if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = fields[part]
    return not dataclasses.is_dataclass(node)


def checked_rows() -> list[tuple[str, object]]:
    """``(key, value)`` of the rows whose key column names run config keys and whose preset has values."""
    checks = []
    for setting, _official, key_cell, preset_cell, _default in table_rows():
        keys = [k for k in TICKED.findall(key_cell) if KEY.match(k)]
        values = TICKED.findall(preset_cell)
        if not keys or not values or preset_cell.startswith("planned"):
            continue  # fixed in code, or not in the configs yet
        assert len(keys) == len(values), f"{setting}: {len(keys)} keys but {len(values)} preset values"
        for key, value in zip(keys, values, strict=True):
            assert run_config_key(key), f"{setting}: {key} is not a run config key"
            checks.append((key, yaml.safe_load(value)))
    return checks


def expected(value: object, dataset: str, model: str) -> object:
    """A preset cell's value for one config: a scalar, or a mapping by dataset, model or dataset/model."""
    if not isinstance(value, dict):
        return value
    for name in (f"{dataset}/{model}", dataset, model):
        if name in value:
            return value[name]
    return None  # the row does not constrain this config


def lookup(cfg: RunConfig, key: str) -> object:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(scope="module")
def configs() -> dict[tuple[str, str], RunConfig]:
    return {(d, m): load_config(REPO / f"configs/{d}/{m}.yaml") for d in DATASETS for m in MODELS}


def test_every_checked_row_matches_the_nine_dataset_configs(configs):
    checks = checked_rows()
    assert len(checks) >= 30, "the pretraining table lost its checked rows"
    compared = 0
    for key, value in checks:
        for (dataset, model), cfg in configs.items():
            want = expected(value, dataset, model)
            if want is None and isinstance(value, dict):
                continue
            assert lookup(cfg, key) == want, f"configs/{dataset}/{model}.yaml: {key}"
            compared += 1
    assert compared >= 9 * 25


def test_the_table_names_the_official_commit():
    text = (REPO / "docs/PROTOCOL.md").read_text()
    assert "6b9cffea9ed33712d0e2449123611b4df671fa9f" in text

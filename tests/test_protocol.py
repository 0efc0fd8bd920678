"""docs/PROTOCOL.md and the code agree: every value in the table is what the configs, the official evaluation
protocol and ilm_dist's defaults load.

Pretraining rows are checked against the nine dataset configs (``official`` preset column) and
``RunConfig()`` (default column); evaluation rows against ``configs/protocols/official.yaml`` resolved for
each of its datasets and the built-in ``ilm_dist`` protocol. A row either names keys, each with one value
in both columns, or is marked *(fixed)*.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ilm_dist.config import RunConfig, load_config, path_keys, section_fields
from ilm_dist.eval.protocol import EvalProtocol, load_protocol
from tests.launcher import REPO

DATASETS = ("nih", "idc", "dr")
MODELS = ("moco", "moco_mse", "moco_bt")
TICKED = re.compile(r"`([^`]+)`")
LEADING = re.compile(r"^(`[^`]+`(, `[^`]+`)*)")  # the values a default cell starts with
RUN_KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
EVAL_KEY = re.compile(r"^((finetune|probe|cka)(\.[a-z_]+)+|inputs)$")
FIXED = "*(fixed)*"


def table_rows(heading: str) -> list[list[str]]:
    """The cells of every row of the table under ``## <heading>`` (header and rule lines excluded)."""
    text = (REPO / "docs/PROTOCOL.md").read_text()
    section = text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("setting", "---"):
            rows.append(cells)
    return rows


def checked_rows(heading: str, key_pattern: re.Pattern) -> list[tuple[str, object, object]]:
    """``(key, preset value, default value)`` of every key in the table's rows."""
    checks = []
    for setting, _official, key_cell, preset_cell, default_cell in table_rows(heading):
        keys = [k for k in TICKED.findall(key_cell) if key_pattern.match(k)]
        if not keys:
            assert key_cell.startswith(FIXED), f"{setting}: no key, and not marked {FIXED}"
            continue
        presets = TICKED.findall(preset_cell)
        leading = LEADING.match(default_cell)
        defaults = TICKED.findall(leading.group(1)) if leading else []
        assert len(presets) == len(keys), f"{setting}: {len(keys)} keys but {len(presets)} preset values"
        assert len(defaults) == len(keys), f"{setting}: {len(keys)} keys but {len(defaults)} default values"
        for key, preset, default in zip(keys, presets, defaults, strict=True):
            checks.append((key, yaml.safe_load(preset), yaml.safe_load(default)))
    return checks


def expected(value: object, *names: str) -> object:
    """A preset cell's value for one config: a scalar, or a mapping by one of ``names``."""
    if not isinstance(value, dict):
        return value
    for name in names:
        if name in value:
            return value[name]
    return None  # the row does not constrain this config


# --------------------------------------------------------------------------- pretraining


def run_config_key(key: str) -> bool:
    """Whether ``key`` names a field of :class:`RunConfig` (sections, and the losses' own sections)."""
    node = RunConfig
    for part in key.split("."):
        fields = section_fields(node) if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = fields[part]
    return True


def lookup(obj: object, key: str) -> object:
    for part in key.split("."):
        obj = None if obj is None else obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def config_value(cfg: RunConfig, key: str) -> object:
    """A key's value; a path as it is written in a config under ``configs/``."""
    value = lookup(cfg, key)
    return str(Path(value).relative_to(REPO / "configs")) if key in path_keys() and value else value


@pytest.fixture(scope="module")
def configs() -> dict[tuple[str, str], RunConfig]:
    return {(d, m): load_config(REPO / f"configs/{d}/{m}.yaml") for d in DATASETS for m in MODELS}


def test_the_pretraining_rows_match_the_nine_dataset_configs_and_the_defaults(configs):
    checks = checked_rows("Pretraining", RUN_KEY)
    assert len(checks) >= 40, "the pretraining table lost its checked rows"
    compared = 0
    for key, preset, default in checks:
        assert run_config_key(key), f"{key} is not a run config key"
        assert config_value(RunConfig(), key) == default, f"default of {key}"
        for (dataset, model), cfg in configs.items():
            want = expected(preset, f"{dataset}/{model}", dataset, model)
            if want is None and isinstance(preset, dict):
                continue
            assert config_value(cfg, key) == want, f"configs/{dataset}/{model}.yaml: {key}"
            compared += 1
    assert compared >= 9 * 35


# --------------------------------------------------------------------------- evaluation


def protocol_value(protocol: EvalProtocol, key: str) -> object:
    if key == "inputs":
        return protocol.inputs
    section, rest = key.split(".", 1)
    return lookup(protocol.settings(section), rest)


def test_the_evaluation_rows_match_the_official_protocol_and_the_defaults():
    official = load_protocol("official")
    resolved = {name: official.resolve(entry["task"], name) for name, entry in official.datasets.items()}
    assert set(resolved) == {"nih", "idc", "dr", "dr_grades"}
    builtin = load_protocol("ilm_dist").resolve("binary", None)
    checks = checked_rows("Evaluation", EVAL_KEY)
    assert len(checks) >= 45, "the evaluation table lost its checked rows"
    compared = 0
    for key, preset, default in checks:
        assert protocol_value(builtin, key) == default, f"default of {key}"
        for name, protocol in resolved.items():
            want = expected(preset, name)
            if want is None and isinstance(preset, dict):
                continue
            assert protocol_value(protocol, key) == want, f"configs/protocols/official.yaml, {name}: {key}"
            compared += 1
    assert compared >= 3 * 45


def test_every_official_setting_is_in_the_table():
    """The official protocol sets nothing that the table does not show."""
    keys = {key for key, _, _ in checked_rows("Evaluation", EVAL_KEY)}
    text = yaml.safe_load((REPO / "configs/protocols/official.yaml").read_text())
    set_keys = {f"{s}.{k}" for s in ("finetune", "probe", "cka") for k in text.get(s, {})} | {"inputs"}
    for entry in text["datasets"].values():
        for section in ("finetune", "probe"):
            for field, value in entry.get(section, {}).items():
                if field == "aug":
                    set_keys |= {f"{section}.aug.{a}" for a in value}
                else:
                    set_keys.add(f"{section}.{field}")
    assert set_keys <= keys, sorted(set_keys - keys)


def test_the_table_names_the_official_commit():
    text = (REPO / "docs/PROTOCOL.md").read_text()
    assert "6b9cffea9ed33712d0e2449123611b4df671fa9f" in text

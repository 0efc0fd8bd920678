"""The evaluation commands' options: declared once on the settings dataclasses, checked before any work,
accepted anywhere on the command line; classes missing from val/test are reported."""

import argparse
import json
from dataclasses import dataclass, field

import pytest

from ilm_dist.errors import InputError
from ilm_dist.eval.commands import finetune_main, probe_main
from ilm_dist.eval.settings import FinetuneSettings, ProbeSettings
from ilm_dist.options import add_options, check_bounds, from_args, given_options, option
from tests.eval.support import pack_dataset

QUICK_PROBE = ["--epochs", "1", "--evals", "1", "--bootstrap", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # val has a single image, of class 0: class 1 has no validation sample
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 24, "val": 1, "test": 6}, num_classes=2)


@dataclass
class Example:
    count: int = field(default=3, metadata=option("how many", min=1))
    rate: float = field(default=0.5, metadata=option("a rate", above=0, max=1))
    flag_name: str = field(default="a", metadata=option("renamed", flag="--other"))
    internal: int = 7  # no option metadata: not on the command line

    def __post_init__(self) -> None:
        check_bounds(self)


def test_options_come_from_the_dataclass_and_build_it_back():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    assert from_args(Example, parser.parse_args([])) == Example()
    args = parser.parse_args(["--count", "5", "--rate", "1", "--other", "b"])
    assert from_args(Example, args, internal=1) == Example(5, 1.0, "b", 1)
    # other defaults (an evaluation protocol's) under the given options, over the dataclass's
    given = parser.parse_args(["--count", "3"])  # the dataclass default, given explicitly
    assert given_options(Example, given) == {"count": 3}
    assert from_args(Example, given, defaults={"count": 9, "rate": 0.25}) == Example(3, 0.25)
    with pytest.raises(SystemExit):
        parser.parse_args(["--internal", "1"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "--count 0: must be >= 1"),
        ({"rate": 0.0}, "--rate 0: must be > 0"),
        ({"rate": 1.5}, "--rate 1.5: must be <= 1"),
        ({"rate": float("nan")}, "--rate nan: must be > 0"),
    ],
)
def test_bounds_name_the_flag(kwargs, message):
    with pytest.raises(InputError, match=message):
        Example(**kwargs)


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (probe_main, ["--epochs", "0"], "--epochs 0: must be >= 1"),
        (probe_main, ["--epochs", "-3"], "--epochs -3: must be >= 1"),
        (probe_main, ["--fraction", "0"], "--fraction 0: must be > 0"),
        (probe_main, ["--lr", "0"], "--lr 0: must be > 0"),
        (probe_main, ["--bootstrap", "-1"], "--bootstrap -1: must be >= 0"),
        (probe_main, ["--workers", "-1"], "--workers -1: must be >= 0"),
        (probe_main, ["--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
        (finetune_main, ["--mode", "linear", "--epochs", "0"], "--epochs 0: must be >= 1"),
        (finetune_main, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (finetune_main, ["--evals", "0"], "--evals 0: must be >= 1"),
        (finetune_main, ["--min-steps", "-1"], "--min-steps -1: must be >= 0"),
        (finetune_main, ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ],
)
def test_a_bad_number_is_one_line_and_writes_nothing(data, tmp_path, capsys, main, argv, message):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--weights",
                "random",
                "--config",
                "configs/demo.yaml",
                "--out",
                str(out),
                f"data.shards={data}",
                *argv,
            ]
        )
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_settings_check_their_values_in_code_too():
    with pytest.raises(InputError, match="--epochs 0"):
        FinetuneSettings(epochs=0)
    with pytest.raises(InputError, match="--fraction 2"):
        ProbeSettings(fraction=2.0)


def test_overrides_anywhere_and_classes_missing_from_val_are_reported(data, tmp_path, caplog):
    out = tmp_path / "eval"
    # overrides before, between and after the options
    head = [
        "data.image_size=32",
        "--weights",
        "random",
        "--config",
        "configs/demo.yaml",
        f"data.shards={data}",
    ]
    probe_main([*head, "--out", str(out), "model.arch=resnet18", *QUICK_PROBE, "data.num_workers=0"])
    record = json.loads((out / "random_init/probe/f1/metrics.json").read_text())
    assert record["classes_without_samples"] == {"val": ["1"], "test": []}
    assert "class(es) '1' have no samples in the val split" in caplog.text

"""ilm_dist.train.faults: ``ILM_DIST_FAULT`` parsing, which (where, step, rank) it fires at, and the kill
it asks for, with ``os.kill`` replaced so that nothing dies."""

import os
import signal

import pytest

from ilm_dist.errors import InputError
from ilm_dist.train import faults


@pytest.fixture
def fault(monkeypatch):
    """``fault(spec, rank=0)``: set ILM_DIST_FAULT and this process's rank."""

    def set_fault(spec: str | None, rank: int = 0) -> None:
        if spec is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, spec)
        monkeypatch.setattr(faults.D, "rank", lambda: rank)

    return set_fault


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("step@3", ("step", 3, None)),
        ("save@12:1", ("save", 12, 1)),
        ("nan@0:0", ("nan", 0, 0)),
        ("", None),
        (None, None),
    ],
)
def test_good_specs_parse(fault, spec, parsed):
    fault(spec)
    assert faults.fault_spec() == parsed


@pytest.mark.parametrize(
    "spec",
    ["stpe@3", "step", "step@", "step@x", "step@-1", "step@3:", "step@3:r1", "step@3:1:2", "@3", "STEP@3"],
)
def test_bad_specs_are_one_line_input_errors_naming_the_value(fault, spec):
    fault(spec)
    with pytest.raises(InputError) as err:
        faults.injected("step", 3)
    message = str(err.value)
    assert message.startswith(f"ILM_DIST_FAULT={spec!r}: expected <where>@<step>[:<rank>]")
    assert "step, save, nan" in message and "\n" not in message


# (spec, rank of this process) -> the (where, step) pairs among WHERE x 0..5 at which it fires
@pytest.mark.parametrize(
    ("spec", "rank", "fires"),
    [
        (None, 0, set()),
        ("step@3", 0, {("step", 3)}),
        ("step@3", 5, {("step", 3)}),  # no rank: every rank
        ("save@2:1", 1, {("save", 2)}),
        ("save@2:1", 0, set()),  # another rank's fault
        ("nan@0:0", 0, {("nan", 0)}),
    ],
)
def test_injected_fires_at_its_place_step_and_rank_only(fault, spec, rank, fires):
    fault(spec, rank)
    found = {(where, step) for where in faults.PLACES for step in range(6) if faults.injected(where, step)}
    assert found == fires


def test_maybe_kill_sends_sigkill_to_this_process_only_when_injected(fault, monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    fault("save@4:1", rank=1)
    faults.maybe_kill("save", 3)
    faults.maybe_kill("step", 4)
    assert kills == []
    faults.maybe_kill("save", 4)
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_unset_costs_no_parsing(fault, monkeypatch):
    fault(None)
    monkeypatch.setattr(faults.D, "rank", lambda: pytest.fail("rank() read without a fault"))
    assert not faults.injected("step", 1)

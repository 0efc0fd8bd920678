"""NanWatch (non-finite losses found at check time, in one transfer) and Heartbeat (who went silent)."""

import math
import re
import threading
import time

import pytest
import torch

from ilm_dist.train.health import Heartbeat, NanWatch, NonFiniteLoss
from ilm_dist.train.run_dir import RunDir

NAMES = ["moco", "mse"]


def terms(moco: float, mse: float, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {"moco": torch.tensor(moco, device=device), "mse": torch.tensor(mse, device=device)}


# --------------------------------------------------------------------------- NanWatch


def test_check_names_the_first_bad_step_and_only_its_bad_terms():
    watch = NanWatch(NAMES)
    for step, (moco, mse) in enumerate([(1.0, 0.5), (0.9, math.inf), (math.nan, math.nan), (0.8, 0.4)]):
        watch.record(10 + step, terms(moco, mse))
    with pytest.raises(NonFiniteLoss) as caught:
        watch.check()
    message = str(caught.value)
    assert message == "step 11: non-finite loss term(s) {'mse': inf}"


def test_a_nan_in_the_first_term_is_named_with_its_step():
    watch = NanWatch(NAMES)
    watch.record(3, terms(0.5, 0.5))
    watch.record(4, terms(math.nan, 0.5))
    with pytest.raises(NonFiniteLoss, match=r"^step 4: non-finite loss term\(s\) \{'moco': nan\}$"):
        watch.check()


def test_check_forgets_what_it_checked():
    watch = NanWatch(NAMES)
    watch.record(1, terms(math.nan, 1.0))
    with pytest.raises(NonFiniteLoss):
        watch.check()
    watch.check()  # the bad step was reported once; nothing is left
    watch.record(2, terms(1.0, 1.0))
    watch.check()
    watch.record(3, terms(1.0, -math.inf))
    with pytest.raises(NonFiniteLoss, match=r"^step 3: .*'mse': -inf"):
        watch.check()


def test_finite_steps_and_an_empty_watch_pass():
    watch = NanWatch(NAMES)
    watch.check()
    for step in range(5):
        watch.record(step, terms(1e30, -1e-30))
    watch.check()


HOST_READS = ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__")


def test_record_never_reads_a_value_and_check_transfers_once(monkeypatch):
    watch = NanWatch(NAMES)
    steps = [{n: t.requires_grad_() * 2 for n, t in terms(1.0, float(step)).items()} for step in range(6)]
    with monkeypatch.context() as patch:  # any read of a value on the host (a sync on a GPU) fails
        for name in HOST_READS:
            patch.setattr(
                torch.Tensor, name, lambda self, *a, _name=name, **k: pytest.fail(f"record: .{_name}")
            )
        for step, loss_terms in enumerate(steps):
            watch.record(step, loss_terms)
    transfers = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        transfers.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("check read a value with .item()"))
    watch.check()
    assert transfers == [(6, 2)]  # every step's terms in one transfer


# --------------------------------------------------------------------------- Heartbeat


def read_beat(hb: Heartbeat, rank: int) -> tuple[str, float]:
    step, stamp = (hb.run.heartbeats / f"rank{rank}").read_text().split()
    return step, float(stamp)


def test_beat_writes_at_most_once_per_period_unless_forced(tmp_path):
    hb = Heartbeat(RunDir(tmp_path), rank=1, world_size=2, period_s=60.0)
    hb.beat(5)
    assert read_beat(hb, 1)[0] == "5"
    hb.beat(6)  # within the period: not written
    assert read_beat(hb, 1)[0] == "5"
    hb.beat(7, force=True)
    step, stamp = read_beat(hb, 1)
    assert step == "7" and abs(stamp - time.time()) < 5
    fast = Heartbeat(RunDir(tmp_path), rank=1, world_size=2, period_s=0.0)
    fast.beat(8)
    assert read_beat(fast, 1)[0] == "8"
    assert sorted(p.name for p in hb.run.heartbeats.iterdir()) == ["rank1"]  # nothing else left in the folder


def beat_until(hb: Heartbeat, step: int, stop: threading.Event) -> None:
    while not stop.is_set():
        hb.beat(step, force=True)
        time.sleep(0.02)


def test_diagnose_names_ranks_silent_since_the_failure_and_ranks_never_heard_from(tmp_path):
    ranks = [Heartbeat(RunDir(tmp_path), rank=r, world_size=4, period_s=0.0) for r in range(4)]
    # rank 2 was last alive at step 7, half a minute before the failure
    (ranks[2].run.heartbeats / "rank2").write_text(f"7 {time.time() - 30:.3f}\n")
    ranks[1].beat(7)
    stop = threading.Event()
    survivor = threading.Thread(target=beat_until, args=(ranks[1], 9, stop))
    survivor.start()  # rank 1 survived: it checks in during the grace period
    try:
        report = ranks[0].diagnose(9, grace_s=0.3)
    finally:
        stop.set()
        survivor.join()
    assert report.startswith("not heard from since the failure: ")
    assert "rank 1" not in report and "rank 0" not in report
    silent_for = re.search(r"rank 2 \(last alive at step 7, (\d+) s before\)", report)
    assert silent_for and 30 <= int(silent_for.group(1)) <= 35, report
    assert "rank 3 (never checked in)" in report
    assert read_beat(ranks[0], 0)[0] == "9"  # the diagnosing rank checked in itself


def test_diagnose_with_every_rank_alive_says_none(tmp_path):
    assert (
        Heartbeat(RunDir(tmp_path), 0, 1).diagnose(3, grace_s=0.05)
        == "not heard from since the failure: none"
    )


def test_diagnose_survives_a_heartbeat_caught_mid_write(tmp_path):
    hb = Heartbeat(RunDir(tmp_path), rank=0, world_size=3, period_s=0.0)
    (hb.run.heartbeats / "rank1").write_text("")  # truncated by its writer, not yet rewritten
    (hb.run.heartbeats / "rank2").write_text("12")  # or half written
    report = hb.diagnose(4, grace_s=0.05)
    assert "rank 1 (never checked in)" in report and "rank 2 (never checked in)" in report

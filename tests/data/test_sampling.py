"""Global-batch sampling: disjoint ranks, equal steps, world-size invariance, resume by slicing."""

import pytest

from ilm_dist.data.sampling import GlobalBatch, rank_batches, sample_seed, steps_per_epoch


def test_the_global_batch_of_a_micro_step_and_of_an_optimizer_step():
    batch = GlobalBatch(per_rank=16, ranks=4, accumulation=2)
    assert (batch.per_micro_step, batch.samples) == (64, 128)
    assert GlobalBatch(8, 3).samples == GlobalBatch(8, 3).per_micro_step == 24  # no accumulation


@pytest.mark.parametrize(("n", "batch", "world"), [(103, 4, 3), (64, 8, 2), (10, 3, 1)])
def test_ranks_are_disjoint_with_equal_steps(n, batch, world):
    per_rank = [rank_batches(n, batch, r, world, seed=1, epoch=2) for r in range(world)]
    steps = steps_per_epoch(n, batch, world)
    assert steps == n // (batch * world)
    assert all(len(b) == steps and all(len(x) == batch for x in b) for b in per_rank)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == steps * batch * world


def test_r_ranks_see_the_global_batches_of_one_rank():
    one = rank_batches(100, 12, 0, 1, seed=3, epoch=0)
    three = [rank_batches(100, 4, r, 3, seed=3, epoch=0) for r in range(3)]
    for step, global_batch in enumerate(one):
        assert global_batch == three[0][step] + three[1][step] + three[2][step]


def test_resume_is_slicing_and_epochs_differ():
    full = rank_batches(50, 5, 1, 2, seed=0, epoch=0)
    assert rank_batches(50, 5, 1, 2, seed=0, epoch=0, start_step=3) == full[3:]
    assert rank_batches(50, 5, 1, 2, seed=0, epoch=1) != full


def test_sample_seeds_are_distinct_and_stable():
    seeds = [sample_seed(0, 0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and seeds == [sample_seed(0, 0, i) for i in range(1000)]
    assert sample_seed(0, 1, 5) != sample_seed(0, 0, 5)
    # each fits a signed 64-bit seed (torch.manual_seed, NumPy) and uses its whole range, top bit included
    assert max(seeds) < 2**63 and {s >> 62 for s in seeds} == {0, 1}

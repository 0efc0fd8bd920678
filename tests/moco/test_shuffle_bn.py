"""Shuffle-BN routing, checked in one process by simulating the all_to_all of R ranks."""

import pytest
import torch

from ilm_dist.moco.shuffle_bn import _pack, _unpack, route, step_permutation


def simulated_all_to_all(sends: list[torch.Tensor], send_splits: list[list[int]]) -> list[torch.Tensor]:
    """What all_to_all_single delivers: rank d gets, in source-rank order, the chunk each rank sent to d."""
    chunks = [list(torch.split(buf, splits)) for buf, splits in zip(sends, send_splits, strict=True)]
    return [torch.cat([chunks[s][d] for s in range(len(sends))]) for d in range(len(sends))]


def old_shuffle(fn, global_batch: torch.Tensor, perm: torch.Tensor, world: int) -> list[torch.Tensor]:
    """The all_gather implementation, for every rank at once: encode perm blocks, un-permute."""
    batch = global_batch.shape[0] // world
    encoded = torch.cat([fn(global_batch[perm[r * batch : (r + 1) * batch]]) for r in range(world)])
    return list(encoded[torch.argsort(perm)].split(batch))


@pytest.mark.parametrize(("world", "batch"), [(2, 5), (3, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("step", [0, 1, 7])
def test_routes_reproduce_the_all_gather_shuffle(world, batch, step):
    global_batch = torch.randn(world * batch, 3, 2, 2)
    perm = step_permutation(world * batch, seed=3, step=step, device=torch.device("cpu"))
    routes = [route(perm, r, batch) for r in range(world)]
    local = global_batch.split(batch)

    received = simulated_all_to_all(
        [local[r][routes[r].send_index] for r in range(world)], [routes[r].send_splits for r in range(world)]
    )
    for r in range(world):
        # what s sends to r is what r expects from s
        assert routes[r].recv_splits == [routes[s].send_splits[r] for s in range(world)]
        mine = torch.empty_like(received[r])
        mine[routes[r].recv_order] = received[r]
        assert torch.equal(mine, global_batch[perm[r * batch : (r + 1) * batch]]), r

    def fn(x):  # a sub-batch statistic, like BatchNorm: the order and membership of the block matter
        return x.flatten(1) - x.flatten(1).mean(0)

    encoded = [fn(global_batch[perm[r * batch : (r + 1) * batch]]) for r in range(world)]
    back = simulated_all_to_all(
        [encoded[r][routes[r].recv_order] for r in range(world)],
        [routes[r].recv_splits for r in range(world)],
    )
    want = old_shuffle(fn, global_batch, perm, world)
    for r in range(world):
        result = torch.empty_like(back[r])
        result[routes[r].send_index] = back[r]
        assert torch.equal(result, want[r]), r


def test_received_rows_are_the_other_ranks_share():
    world, batch = 4, 64
    perm = step_permutation(world * batch, seed=0, step=0, device=torch.device("cpu"))
    for r in range(world):
        rt = route(perm, r, batch)
        assert sum(rt.send_splits) == sum(rt.recv_splits) == batch
        images, outputs = rt.received_rows(r)
        assert images == int((perm[r * batch : (r + 1) * batch] // batch != r).sum())
        # about (R-1)/R of the batch, not batches as with all_gather
        assert 0.5 * batch < images < batch and 0.5 * batch < outputs < batch


def test_pack_roundtrips_mixed_dtypes_and_shapes():
    batch = 3
    outputs = [
        torch.randn(batch, 5),
        torch.randn(batch, 2, 2).bfloat16(),
        torch.arange(batch),
        torch.rand(batch) > 0.5,
    ]
    packed, meta = _pack(outputs, batch)
    assert packed.dtype == torch.uint8 and packed.shape == (batch, 20 + 8 + 8 + 1)
    # rows move as a unit: permuting the packed rows permutes every output alike
    order = torch.tensor([2, 0, 1])
    for got, want in zip(_unpack(packed[order], meta), outputs, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want[order])
    with pytest.raises(ValueError, match="expected 4 rows"):
        _pack(outputs, 4)

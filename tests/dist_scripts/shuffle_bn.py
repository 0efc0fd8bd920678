"""shuffled_forward (all_to_all) against the all_gather implementation it replaced, on real ranks.

    deepspeed --num_gpus R tests/dist_scripts/shuffle_bn.py OUT_DIR

Asserts on every rank, then writes OUT_DIR/rank<r>.json with what was checked. The key function is
ilm_dist's real one (ResNet-18 key encoder in train mode, so BatchNorm uses the sub-batch statistics,
plus the intermediate MSE reductions), so the outputs depend on exactly which samples share a
sub-batch and in which order.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.moco.shuffle_bn import route, shuffled_forward, step_permutation
from ilm_dist.model.moco import MoCoILM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from shuffle_bn import all_gather_shuffled_forward

BATCH, SIZE, SEED = 6, 32, 11


def single_process_reference(fn, global_batch, seed, step, world, rank):
    """The definition, computed locally on the whole global batch: BN per permuted sub-batch."""
    perm = step_permutation(global_batch.shape[0], seed, step, torch.device("cpu"))
    blocks = [fn(global_batch[perm[r * BATCH : (r + 1) * BATCH]]) for r in range(world)]
    inverse = torch.argsort(perm)[rank * BATCH : (rank + 1) * BATCH]
    return [torch.cat(parts)[inverse] for parts in zip(*blocks, strict=True)]


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    world, rank = D.world_size(), D.rank()
    torch.manual_seed(0)
    cfg = load_config(
        "configs/demo.yaml",
        ["data.backend=synthetic", f"data.image_size={SIZE}", "loss.mse.pool_sizes=[4, 2, 2, 1]"],
    )
    model = MoCoILM(cfg.model, cfg.moco, cfg.loss)
    key_encoder = copy.deepcopy(model.encoder).train()  # BN from the batch: the point of the shuffle
    for p in key_encoder.parameters():
        p.requires_grad_(True)  # as if it were trainable: the key path must still stay out of autograd
    seen = []

    def fn(x):
        seen.append(x)
        return model.key_features(key_encoder, x)

    def mixed(x):  # several dtypes and shapes through the packed return path
        return [x.flatten(1).bfloat16(), (x > 0).flatten(1).sum(1), x.mean((1, 2, 3)) > 0, x[:, :1].double()]

    record = {"rank": rank, "world": world, "steps": []}
    uneven = False
    for step in range(6):
        gen = torch.Generator().manual_seed(1000 * step)
        global_batch = torch.randn(world * BATCH, 3, SIZE, SIZE, generator=gen)
        images = global_batch[rank * BATCH : (rank + 1) * BATCH].clone()
        r = route(step_permutation(world * BATCH, SEED, step, torch.device("cpu")), rank, BATCH)
        uneven |= len(set(r.send_splits)) > 1

        got = shuffled_forward(fn, images, SEED, step)
        want = all_gather_shuffled_forward(fn, images, SEED, step)
        ref = single_process_reference(fn, global_batch, SEED, step, world, rank)
        assert len(got) == len(want) == len(ref) == 1 + len(cfg.loss.blocks)
        for g, w, e in zip(got, want, ref, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
            assert torch.equal(g, w), (step, (g - w).abs().max())
            assert torch.equal(g, e), (step, (g - e).abs().max())
            assert not g.requires_grad and g.grad_fn is None
        assert all(p.grad is None for p in key_encoder.parameters())

        got = shuffled_forward(mixed, images, SEED, step)
        for g, w in zip(got, all_gather_shuffled_forward(mixed, images, SEED, step), strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), step

        # channels-last input is moved in its own layout and reaches the key encoder channels-last
        seen.clear()
        got = shuffled_forward(fn, images.contiguous(memory_format=torch.channels_last), SEED, step)
        assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
        perm = step_permutation(world * BATCH, SEED, step, torch.device("cpu"))
        assert torch.equal(seen[0], global_batch[perm[rank * BATCH : (rank + 1) * BATCH]])
        for g, w in zip(got, want, strict=True):  # the convolutions round differently in NHWC
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

        images_in, outputs_back = r.received_rows(rank)
        record["steps"].append(
            {
                "step": step,
                "send_splits": r.send_splits,
                "recv_splits": r.recv_splits,
                "rows_received": [images_in, outputs_back],
            }
        )
    assert uneven, "no step had uneven per-rank splits; pick other seeds"
    record["checked"] = [
        "all_gather implementation",
        "single-process reference",
        "mixed dtypes",
        "channels_last",
    ]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    D.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--local_rank", type=int)  # added by the deepspeed launcher
    main(parser.parse_args().out)

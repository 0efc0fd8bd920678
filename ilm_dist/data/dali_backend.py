"""The GPU data path: NVIDIA DALI reads the packed shards, decodes with nvJPEG and augments on the GPU.

Reading: ``fn.readers.webdataset`` over the split's shards and index files, sharded by global rank (rank
``r`` of ``R`` reads the ``r``-th contiguous ``1/R`` of the samples, padded to equal length) and shuffled
in a buffer of ``data.shuffle_buffer`` samples. The shard order is permuted per epoch (same permutation
on every rank), so a rank reads other shards in the next epoch. Every rank stops after
``num_samples // (batch * R)`` steps, so all ranks run the same number of steps; the rest of each rank's
part is left out of that epoch. Unlike the torch backend, a global batch depends on ``R``.

Each epoch is a fresh pipeline seeded from ``(seed, rank, epoch)``: an epoch's order and views do not
depend on the epochs before it. ``start_step`` runs and discards the first batches (it costs their
decoding). In CPU mode this reproduces the uninterrupted epoch exactly (tested); on a GPU the random
draws are seeded the same way, but whether nvJPEG's hardware/CUDA split decodes bit-identically is not
verified, and a resume on a different ``R`` or shuffle buffer sees a different order. Exact resume under
any layout is the torch backend's property.

On a CPU training device the same graph runs on the CPU (``device_id=None``, decoder ``cpu``): that is
how it is tested without a GPU. Views are float32 (DALI has no bf16; the trainer casts), ``[B, 3, S, S]``;
with ``model.channels_last`` DALI writes HWC and the views are channels-last NCHW tensors without a copy.
``indices`` are the samples' positions in the split, as in the torch backend (from DALI's source_info).

Bad data: samples without a ``.jpg``/``.lbl`` (or with a ``.lbl`` of the wrong width) are found in the
index files at start-up, and an undecodable JPEG met during an epoch is traced back to its shard and key
(see :mod:`ilm_dist.data.dali_shards`); both raise :class:`ManifestError`. With ``data.dali.skip_bad``
the start-up scan also decodes every JPEG (each rank of the group a share, the findings merged) and drops
(and counts) the bad samples before DALI sees them; an image that passes that scan but fails in nvJPEG
still raises.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ilm_dist import distributed as D
from ilm_dist.config import AugConfig, DataConfig
from ilm_dist.data.batch import Placement, TwoViewBatch
from ilm_dist.data.dali_augment import moco_view
from ilm_dist.data.dali_shards import BadSample, decode_problem, find_undecodable, scan_split, write_indexes
from ilm_dist.data.manifest import Manifest, ManifestError
from ilm_dist.data.sampling import steps_per_epoch
from ilm_dist.data.shard_format import split_member, squeeze_labels

log = logging.getLogger("ilm_dist")

READER = "shards"
OUTPUTS = ["view1", "view2", "labels", "source_info"]
LISTED = 10  # bad samples named in one message


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(reader: dict[str, Any], aug, size: int, layout: str, hw_decoder_load: float | None):
    """Decode each sample once and draw two independent MoCo v2 views; ``hw_decoder_load`` None: CPU."""
    jpg, label = fn.readers.webdataset(**reader)
    source_info = fn.pad(fn.get_property(jpg, key="source_info"))
    if hw_decoder_load is None:
        image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
    else:
        image = fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        label = label.gpu()
    return moco_view(image, aug, size, layout), moco_view(image, aug, size, layout), label, source_info


@pipeline_def
def reader_pipeline(reader: dict[str, Any]):
    """The reader alone (no decoding): replays an epoch's sample stream to find a bad sample."""
    jpg, _ = fn.readers.webdataset(**reader)
    return jpg, fn.get_property(jpg, key="source_info")


class DaliLoader:
    def __init__(self, data: DataConfig, aug: AugConfig, where: Placement, manifest: Manifest):
        rank, world_size, device = where.rank, where.world_size, where.device
        self.data, self.aug, self.where = data, aug, where
        undecodable = _shared_decode_scan(manifest, data.split) if data.dali.skip_bad else None
        self.scan = scan_split(manifest, data.split, undecodable)
        self._check_scan()
        self.index_paths = self._index_paths()
        self.device_id = None if device.type == "cpu" else _cuda_index(device)
        self.layout = "HWC" if where.channels_last else "CHW"
        self.steps_per_epoch = steps_per_epoch(self.scan.num_samples, data.batch_size, world_size)
        if self.steps_per_epoch == 0:
            raise ManifestError(
                f"{data.shards} [{data.split}]: {self.scan.num_samples} usable samples cannot fill one step of "
                f"{world_size} ranks x batch {data.batch_size}"
            )
        where = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        self.description = (
            f"dali ({where}): {self.scan.num_samples} samples of {data.shards} [{data.split}]"
            f"{f' ({len(self.scan.bad)} bad skipped)' if self.scan.bad else ''}"
            f"{f', JPEGs checked by {D.world_size()} rank(s) in turn' if data.dali.skip_bad else ''}, rank {rank} reads part "
            f"{rank + 1}/{world_size}, {self._threads} threads, {self.steps_per_epoch} steps/epoch"
        )

    @property
    def _threads(self) -> int:
        return max(1, self.data.num_workers)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TwoViewBatch]:
        if start_step >= self.steps_per_epoch:
            return
        for step, outputs in enumerate(self._dali_outputs(epoch)):
            if step >= start_step:
                yield self._batch(outputs)

    # ------------------------------------------------------------------ pipeline

    def _dali_outputs(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        data = self.data
        pipe = two_view_pipeline(
            reader=self._reader_args(epoch),
            aug=self.aug,
            size=data.image_size,
            layout=self.layout,
            hw_decoder_load=None if self.device_id is None else data.dali.hw_decoder_load,
            batch_size=data.batch_size,
            num_threads=self._threads,
            device_id=self.device_id,
            seed=self._seed(epoch),
            prefetch_queue_depth=data.dali.prefetch,
        )
        iterator = self._guard(
            epoch,
            0,
            lambda: DALIGenericIterator(
                pipe, OUTPUTS, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP
            ),
        )
        for step in range(self.steps_per_epoch):
            yield self._guard(epoch, step, lambda: next(iterator)[0])

    def _seed(self, epoch: int) -> int:
        """This rank's seed for ``epoch`` (shuffle buffer and augmentations)."""
        return int(
            np.random.SeedSequence([self.where.seed, self.where.rank, epoch]).generate_state(1)[0]
            & 0x7FFFFFFF
        )

    def _reader_args(self, epoch: int) -> dict[str, Any]:
        # The shard order is permuted per epoch with a seed every rank shares, so the ranks' contiguous
        # parts cover different shards from epoch to epoch, and stay disjoint within one.
        order = np.random.default_rng([self.where.seed, epoch]).permutation(len(self.scan.tars))
        return {
            "paths": [str(self.scan.tars[i]) for i in order],
            "index_paths": [str(self.index_paths[i]) for i in order],
            "ext": ["jpg", "lbl"],
            "dtypes": [types.UINT8, types.INT32],
            "missing_component_behavior": "error",  # the start-up scan already removed or rejected such samples
            "shard_id": self.where.rank,
            "num_shards": self.where.world_size,
            "pad_last_batch": True,
            "random_shuffle": self.data.shuffle_buffer > 0,
            "initial_fill": max(1, self.data.shuffle_buffer),
            "seed": self._seed(epoch),
            "name": READER,
        }

    def _batch(self, outputs: dict[str, torch.Tensor]) -> TwoViewBatch:
        views = [outputs[name] for name in ("view1", "view2")]
        if self.layout == "HWC":
            views = [view.permute(0, 3, 1, 2) for view in views]  # NCHW shape, channels-last strides
        labels = outputs["labels"].long()
        infos = outputs["source_info"].numpy()
        indices = torch.tensor([self.scan.position(bytes(row).rstrip(b"\0").decode()) for row in infos])
        return TwoViewBatch(*views, squeeze_labels(labels), indices)

    # ------------------------------------------------------------------ bad data

    def _check_scan(self) -> None:
        bad, split = self.scan.bad, self.data.split
        if bad and not self.data.dali.skip_bad:
            raise ManifestError(
                f"split {split!r} has {len(bad)} unusable sample(s) (repack, or set data.dali.skip_bad=true "
                f"to drop them):\n{_listing(bad)}"
            )
        if bad:
            log.warning(
                "dali: dropping %d unusable sample(s) of split %r:\n%s", len(bad), split, _listing(bad)
            )

    def _index_paths(self) -> list[Path]:
        """The packed index files, or (when samples were dropped) filtered copies in a temporary directory."""
        if not self.scan.bad:
            return self.scan.indexes
        self._index_dir = tempfile.TemporaryDirectory(prefix="ilm_dist_dali_")
        return write_indexes(self.scan, Path(self._index_dir.name))

    def _guard(self, epoch: int, step: int, call: Callable[[], Any]) -> Any:
        """Run ``call``; turn a DALI failure caused by a bad sample into a ManifestError naming it."""
        try:
            return call()
        except RuntimeError as err:
            bad = self._bad_in_flight(epoch, step)
            if not bad:
                raise
            note = " (not caught by the data.dali.skip_bad scan)" if self.data.dali.skip_bad else ""
            raise ManifestError(f"DALI failed on bad sample(s){note}:\n{_listing(bad)}") from err

    def _bad_in_flight(self, epoch: int, step: int) -> list[BadSample]:
        """Replay the epoch's reader stream up to the batches in flight at ``step`` and decode-check them."""
        data = self.data
        pipe = reader_pipeline(
            reader=self._reader_args(epoch),
            batch_size=data.batch_size,
            num_threads=1,
            device_id=None,
            seed=self._seed(epoch),
        )
        bad: dict[str, BadSample] = {}
        for replayed in range(step + data.dali.prefetch + 1):
            jpgs, infos = pipe.run()
            if replayed < step:
                continue
            for jpg, info in zip(jpgs, infos, strict=True):
                reason = decode_problem(np.asarray(jpg).tobytes())
                if reason:
                    tar, _, name = bytes(np.asarray(info)).decode().rsplit(":", 2)
                    bad[f"{tar}:{name}"] = BadSample(Path(tar), split_member(name)[0] or name, reason)
        return list(bad.values())


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _listing(bad: list[BadSample]) -> str:
    lines = [f"  {sample}" for sample in bad[:LISTED]]
    if len(bad) > LISTED:
        lines.append(f"  ... and {len(bad) - LISTED} more")
    return "\n".join(lines)


def _shared_decode_scan(manifest: Manifest, split: str) -> dict[tuple[str, str], str]:
    """:func:`find_undecodable` over the whole split, each rank of the process group decoding every R-th
    sample and all of them merged: the same answer on every rank at 1/R of the reading each (every rank
    decoding everything read the split R times, and uneven file systems could run one rank past the others'
    collective timeout). A collective when a group of several ranks exists: every rank builds its loader."""
    found: dict[tuple[str, str], str] = {}
    for part in D.all_gather_object(find_undecodable(manifest, split, D.rank(), D.world_size())):
        found |= part
    return found

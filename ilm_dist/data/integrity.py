"""Before a run reads a packed split: its shards hold what ``manifest.json`` promises, or the run stops.

:func:`ilm_dist.data.manifest.load_manifest` already refuses what a stat and the manifest show (files listed
twice, class counts that do not add up, a shard whose size is not the packed size). Here, before any step:
every sample key of the split is unique across its index files (a shard replaced by a copy of another
repeats 64 of them), and every shard's sha256 equals the manifest's (bytes changed in place, same size). The
hashing reads the split once at start-up, shared between the ranks of the group (each hashes every R-th
shard): about 1.2 GB/s on one core of the project's CPU once the files are cached (``bench/shard_integrity.py``;
the key check costs about as much again for small shards), i.e. about 85 s per 100 GB for one rank, divided
by the number of ranks; ``data.verify_sha256=false`` skips it for a trusted copy (sizes, counts and keys are
still checked). Every rank reaches the same verdict and stops with one line naming the shard.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter

from ilm_dist import distributed as D
from ilm_dist.data.manifest import Manifest, ManifestError, ShardInfo
from ilm_dist.data.shard_format import read_index

log = logging.getLogger("ilm_dist")


def check_split_content(manifest: Manifest, split: str, hash_shards: bool) -> None:
    """Unique sample keys in ``split``'s indexes and, with ``hash_shards``, each shard's sha256 (a collective
    when a group of several ranks exists: every rank calls it)."""
    shards = manifest.split(split).shards
    _check_unique_keys(shards, split)
    if hash_shards:
        _check_hashes(shards, split)


def _check_unique_keys(shards: tuple[ShardInfo, ...], split: str) -> None:
    where: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for shard in shards:
        for ref in read_index(shard.index)[0]:
            counts[ref.key] += 1
            where.setdefault(ref.key, shard.tar.name)
    repeated = [key for key, count in counts.items() if count > 1]
    if repeated:
        raise ManifestError(
            f"{shards[0].tar.parent}: split {split!r} holds {len(repeated)} sample key(s) more than once, e.g. "
            f"{repeated[0]!r} (first in {where[repeated[0]]}): a shard replaced by a copy of another? check with "
            "python -m data_tools.verify"
        )


def _check_hashes(shards: tuple[ShardInfo, ...], split: str) -> None:
    start, part, parts = time.perf_counter(), D.rank(), D.world_size()
    mine = [shard for i, shard in enumerate(shards) if i % parts == part]
    wrong = [(str(s.tar), digest, s.sha256) for s in mine if (digest := _sha256(s)) != s.sha256]
    found = [w for ws in D.all_gather_object(wrong) for w in ws]
    if found:
        tar, digest, expected = found[0]
        raise ManifestError(
            f"{tar}: sha256 {digest[:16]}... differs from manifest.json's {expected[:16]}... ({len(found)} of "
            f"{len(shards)} shard(s) of split {split!r} changed since they were packed; check with "
            "python -m data_tools.verify)"
        )
    megabytes = sum(s.tar.stat().st_size for s in mine) / 1e6
    log.info(
        "split %r: sha256 of its %d shard(s) as in manifest.json (this rank: %d, %.0f MB in %.1f s)",
        split,
        len(shards),
        len(mine),
        megabytes,
        time.perf_counter() - start,
    )


def _sha256(shard: ShardInfo) -> str:
    with open(shard.tar, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()

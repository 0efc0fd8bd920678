"""Writing a packed dataset: shard plan, parallel shard writing, manifest, and the staging directory that
makes the output appear only when complete.

Keys are ``{split}_{index:08d}`` (index within the split, in shard order); shards are
``{split}-{shard:06d}.tar`` with the DALI index ``{split}-{shard:06d}.idx`` next to it (the names are
`ilm_dist.data.shard_format`'s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from data_tools.errors import PackError, writing
from data_tools.parallel import parallel_map
from data_tools.records import Record
from data_tools.shard_writer import EncodeOptions, ShardJob, ShardResult, write_shard
from ilm_dist.data.manifest import FORMAT, ManifestError, load_manifest
from ilm_dist.data.shard_format import LabelSpace, sample_key, shard_name
from ilm_dist.folder_lock import FolderLock


def plan_shards(
    root: Path, splits: dict[str, list[Record]], labels: LabelSpace, encode: EncodeOptions, shard_size: int
) -> list[ShardJob]:
    jobs = []
    for split, records in splits.items():
        keyed = [(sample_key(split, i), record) for i, record in enumerate(records)]
        for shard, start in enumerate(range(0, len(keyed), shard_size)):
            samples = tuple(keyed[start : start + shard_size])
            jobs.append(ShardJob(split, root / shard_name(split, shard), samples, labels, encode))
    return jobs


def write_splits(
    root: Path,
    splits: dict[str, list[Record]],
    labels: LabelSpace,
    encode: EncodeOptions,
    shard_size: int,
    workers: int,
    quiet: bool = False,
) -> dict[str, dict]:
    """Write every shard (in parallel) and return the manifest's ``splits`` section."""
    jobs = plan_shards(root, splits, labels, encode, shard_size)
    results = parallel_map(
        write_shard, jobs, workers, "writing shards", weight=lambda job: len(job.samples), quiet=quiet
    )
    by_split: dict[str, list[ShardResult]] = {split: [] for split in splits}
    for job, result in zip(jobs, results, strict=True):
        by_split[job.split].append(result)
    return {split: _split_entry(splits[split], shards, labels) for split, shards in by_split.items()}


def _split_entry(records: list[Record], shards: list[ShardResult], labels: LabelSpace) -> dict:
    groups = {record.group for record in records if record.group is not None}
    return {
        "num_samples": len(records),
        "class_counts": labels.counts([record.labels for record in records]),
        "num_groups": len(groups) if groups else None,
        "shards": [
            {
                "name": shard.tar.name,
                "index": shard.index.name,
                "num_samples": shard.num_samples,
                "sha256": shard.sha256,
                "bytes": shard.bytes,
            }
            for shard in shards
        ],
    }


def build_manifest(
    *,
    labels: LabelSpace,
    image_mode: str,
    split_method: str,
    splits: dict[str, dict],
    skipped: list[dict[str, str]],
    source: dict,
    args: dict,
    extra: dict | None = None,
) -> dict:
    """The manifest (see `ilm_dist.data.manifest`); ``extra`` adds entries such as ``dicom``."""
    return {
        "format": FORMAT,
        "task": labels.task,
        "class_names": list(labels.class_names),
        "image_mode": image_mode,
        "split_method": split_method,
        "splits": splits,
        "skipped": {"count": len(skipped), "files": skipped},
        "source": jsonable(source),
        "args": jsonable(args),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **jsonable(extra or {}),
    }


def jsonable(value: object) -> object:
    """Paths → str, tuples → lists, dataclasses → dicts, recursively."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    return str(value) if isinstance(value, Path) else value


STAGING_FILES = re.compile(r"[\w.-]+\.(tar|idx)|manifest\.json(\.partial)?")  # what a packer writes


class Staging:
    """Build the output in ``OUT_DIR.tmp-<pid>`` and move it into place only on `commit`.

    On any failure (Ctrl-C included) the temporary directory is removed, so a directory with a
    ``manifest.json`` is always complete.  ``OUT_DIR`` must not be a file or lie under one, and must neither
    contain nor lie inside ``protect`` (the source).  An existing non-empty ``OUT_DIR`` is refused unless
    ``overwrite``, and even then unless it holds a packed dataset and nothing else: ``commit`` removes only
    the files its ``manifest.json`` names.  A packer killed outright (SIGKILL, power loss) cannot clean up:
    the next run on the same ``OUT_DIR`` removes the ``OUT_DIR.tmp-<pid>`` / ``OUT_DIR.old-<pid>``
    directories of processes that are no longer running and says so, and refuses to start while such a
    process runs. A packer holds ``.<OUT_DIR name>.lock`` beside ``OUT_DIR`` from its construction (use it as a
    context manager from there) until it exits (:class:`ilm_dist.folder_lock.FolderLock`).
    """

    def __init__(self, out_dir: Path, overwrite: bool, protect: Path | None = None):
        self.out = Path(os.path.realpath(out_dir))  # a link to a folder: the dataset goes into that folder
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}")
        self.committed = False
        self.replaced: set[str] = set()  # the earlier dataset's files, removed by `commit`
        _check_place(out_dir, protect)
        # beside OUT_DIR, which commit swaps: a second packer on it stops here naming this one
        self.lock = FolderLock(
            self.out.parent, f"packer of {self.out.name}", name=f".{self.out.name}.lock", subject=self.out
        )
        try:
            if self.out.is_dir() and any(self.out.iterdir()):
                if not overwrite:
                    raise PackError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
                self.replaced = _packed_files(out_dir)
            self._remove_stale()
        except BaseException:
            self.lock.release()
            raise

    def _remove_stale(self) -> None:
        """Remove what killed packers left next to ``OUT_DIR``; refuse while one of them still runs."""
        pattern = re.compile(rf"{re.escape(self.out.name)}\.(tmp|old)-(\d+)")
        parent = self.out.parent
        for path in sorted(parent.iterdir()) if parent.is_dir() else []:
            match = pattern.fullmatch(path.name)
            if match is None or not path.is_dir():
                continue
            pid = int(match[2])
            if pid != os.getpid() and _running(pid):
                raise PackError(
                    f"{path}: process {pid} is writing {self.out} (another packer?); wait for it, or stop it "
                    "and remove this directory"
                )
            foreign = [p.name for p in path.iterdir() if not STAGING_FILES.fullmatch(p.name)]
            if foreign:
                raise PackError(
                    f"{path}: left by process {pid}, which is not running, but it holds files a packer does "
                    f"not write ({foreign[:3]}); look at it and remove it yourself"
                )
            with writing(path):
                shutil.rmtree(path)
            print(
                f"note: removed {path}, left by an interrupted packer (process {pid} is not running)",
                file=sys.stderr,
            )

    def __enter__(self) -> Staging:
        with writing(self.tmp):
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()

    def commit(self, manifest: dict) -> None:
        """Write ``manifest.json`` atomically, then swap the staging directory into ``OUT_DIR``."""
        partial = self.tmp / "manifest.json.partial"
        with writing(partial), open(partial, "w") as file:
            json.dump(manifest, file, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.tmp / "manifest.json")
        old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
        with writing(self.out):
            if self.out.exists():
                os.rename(self.out, old)
            os.rename(self.tmp, self.out)
        self.committed = True
        if old.exists():
            with writing(old):
                for name in self.replaced:
                    (old / name).unlink(missing_ok=True)
                old.rmdir()


def _check_place(out_dir: Path, protect: Path | None) -> None:
    """``out_dir`` can be a new folder: it is no file, lies under none, and is apart from ``protect``."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise PackError(f"{out_dir}: exists and is not a directory")
    above = next(path for path in (out, *out.parents) if path.exists())
    if not above.is_dir():
        raise PackError(f"{out_dir}: cannot be created, {above} is a file, not a directory")
    if protect is None:
        return
    source, target = protect.resolve(), out.resolve()
    if target in (source, *source.parents):
        raise PackError(f"{out_dir}: the output directory would contain the source {protect}")
    if source in target.parents:
        raise PackError(
            f"{out_dir}: is inside the source {protect}, so packing it again would read this output as "
            "source data; choose an output directory outside it"
        )


def _packed_files(out_dir: Path) -> set[str]:
    """The files of the packed dataset in ``out_dir`` (its manifest, shards and indices), which
    ``--overwrite`` may remove; anything else there is refused, named."""
    if not (out_dir / "manifest.json").is_file():
        raise PackError(f"{out_dir}: refusing to overwrite, it is not a packed dataset (no manifest.json)")
    try:
        names = load_manifest(out_dir, check_files=False).file_names
    except ManifestError as err:
        raise PackError(f"refusing to overwrite {out_dir}: {err}") from None
    foreign = sorted(
        f"{path.name}/" if path.is_dir() else path.name
        for path in out_dir.iterdir()
        if path.is_dir() or path.name not in names
    )
    if foreign:
        raise PackError(
            f"{out_dir}: refusing to overwrite, it holds what is not part of its packed dataset: "
            f"{', '.join(foreign[:5])} ({len(foreign)} in all); move them out, or choose another output directory"
        )
    return names


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

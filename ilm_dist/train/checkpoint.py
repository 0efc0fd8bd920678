"""Checkpoints: DeepSpeed's engine state with the MoCo state as its client state, an atomic ``latest``, rotation.

Layout (:class:`ilm_dist.train.run_dir.RunDir` names it): ``output_dir/checkpoints/step_<N>/`` holds
DeepSpeed's files; the key encoder, the queue, the data position and (under ZeRO) the full optimizer state travel in DeepSpeed's ``client_state`` (inside
``mp_rank_00_model_states.pt``), so one ``save_checkpoint`` / ``load_checkpoint`` pair keeps the whole
training state, on any world size. ``latest`` names the last
complete checkpoint; it is replaced atomically (write + rename) only after every rank has finished writing,
so a crash or a full disk during a save leaves it naming the previous complete checkpoint. (DeepSpeed's
own ``save_latest`` truncates and rewrites the file in place: a full disk at that moment would empty it.)
A save that fails removes what it half-wrote. Older tags beyond ``keep`` are deleted after the new one is
complete. Every file is read with ``weights_only=True`` (:func:`ilm_dist.train.engine.safe_checkpoint_engine`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ilm_dist import distributed as D
from ilm_dist.errors import InputError
from ilm_dist.serialization import CheckpointWriteError, load_tensors
from ilm_dist.train import faults
from ilm_dist.train.run_dir import RunDir
from ilm_dist.train.zero_state import gather_full_optimizer_state, restore_full_optimizer_state

ZERO_PARTITIONS = "zero_pp_rank_*_mp_rank_*_optim_states.pt"  # one file per data-parallel rank
LEGACY_MOCO_STATE = "moco_state.pt"  # the sidecar file of checkpoints written before client_state
FULL_OPTIMIZER_STATE = "full_optimizer_state"  # client-state key of the ZeRO state for another world size


def save(engine, run: RunDir, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Save the engine and ``client_state`` as ``step_<step>``, then move ``latest`` and rotate.

    A step that is already the latest checkpoint is not written again (its state is this state): rank 0
    reads ``latest`` and every rank follows its answer, since ranks reading it themselves could disagree
    (a network file system caching attributes) and one would skip the collectives the others enter. A write
    error raises :class:`CheckpointWriteError` naming the file, after removing the partial checkpoint.
    """
    root, path = run.checkpoints, run.checkpoint(step)
    tag = path.name
    if D.on_main(run.latest_tag) == tag:
        return path
    client_state = {**client_state, FULL_OPTIMIZER_STATE: gather_full_optimizer_state(engine)}
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)
        raise CheckpointWriteError(
            err.errno, f"{err.strerror or err}; removed the partial {path}; {_kept(run)}"
        ) from None
    D.barrier()  # every rank's files are complete
    faults.maybe_kill("save", step)
    if D.rank() == 0:
        _write_atomic(run.latest, tag)
        _rotate(root, keep)
    D.barrier()
    return path


def _kept(run: RunDir) -> str:
    latest = run.latest_tag()
    return (
        f"the previous checkpoint {run.checkpoint(latest)} and '{RunDir.LATEST}' are intact"
        if latest
        else "no earlier checkpoint"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            err.errno, f"{path}: {err.strerror or err}; 'latest' was not changed"
        ) from None


def _rotate(root: Path, keep: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := RunDir.TAG.match(p.name)))
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run: RunDir) -> Path:
    """The directory ``latest`` names; :class:`InputError` (for ``--resume``) when there is none."""
    tag = run.latest_tag()
    if tag is None:
        raise InputError(
            f"--resume: no checkpoint in {run.checkpoints} (no '{RunDir.LATEST}' file); start without --resume"
        )
    # an emptied file would name the checkpoints folder itself, '../x' one outside it
    if not RunDir.TAG.match(tag):
        raise InputError(f"--resume: {run.latest} names {tag!r}, not a checkpoint tag step_<N> of ilm_dist")
    if not run.checkpoint(tag).is_dir():
        raise InputError(f"--resume: {run.latest} names {tag!r}, but {run.checkpoint(tag)} is missing")
    return run.checkpoint(tag)


def zero_world_size(path: Path) -> int:
    """The data-parallel world size a checkpoint's ZeRO optimizer partitions were written for (0: no ZeRO)."""
    return len(list(path.glob(ZERO_PARTITIONS)))


def restore(engine, run: RunDir, world_size: int) -> dict[str, Any]:
    """Load the latest checkpoint into ``engine`` (module, optimizer, LR schedule, step); returns its client state.

    On another world size ZeRO's optimizer partitions do not fit: the optimizer state then comes from the
    full copy every ZeRO checkpoint carries (:mod:`ilm_dist.train.zero_state`), re-partitioned for this
    world. Unreadable files and state that does not fit the model raise :class:`InputError` naming the
    checkpoint. Which checkpoint, and for how many ranks its partitions were written, rank 0 finds and every
    rank follows (as in :func:`save`), so no rank loads another step than the others.
    """
    path, partitions = D.on_main(lambda: _latest_and_partitions(run))
    repartition = engine.zero_optimization_stage() > 0 and partitions not in (0, world_size)
    try:
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=not repartition
        )
    except RuntimeError as err:  # load_state_dict: the checkpoint's tensors do not fit this model
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise InputError(f"--resume: {path} does not fit this run's model: {first}") from None
    if loaded is None:
        raise InputError(f"--resume: DeepSpeed found no checkpoint to load in {path}")
    if "moco" not in client_state:
        client_state = {"moco": load_tensors(path / LEGACY_MOCO_STATE, "MoCo state of an older checkpoint")}
    if repartition:
        if client_state.get(FULL_OPTIMIZER_STATE) is None:
            raise InputError(
                f"--resume: {path} holds ZeRO optimizer partitions for {partitions} ranks and no full "
                f"copy (written by an older ilm_dist); resume it on {partitions} ranks"
            )
        restore_full_optimizer_state(engine, client_state[FULL_OPTIMIZER_STATE])
        # the optimizer's own LR was not loaded with its partitions: take the restored schedule's
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    return client_state


def _latest_and_partitions(run: RunDir) -> tuple[Path, int]:
    path = latest_checkpoint(run)
    return path, zero_world_size(path)

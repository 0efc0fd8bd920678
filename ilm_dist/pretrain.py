"""The pretraining command: ``launch/pretrain.py``, ``python -m ilm_dist.pretrain`` and ``ilm-pretrain``.

Checks the config and its data before any process group exists, builds the trainer (with the kNN monitor
when ``monitor.every`` is set and the validation loss when ``val.every`` is) and turns every failure into one line and an exit status: 2 bad input or
a full disk, 3 a non-finite loss, 4 a lost rank.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ilm_dist.distributed import shutdown
from ilm_dist.errors import EXIT_INPUT_ERROR, ArgumentParser, InputError, exit_on_input_error, fail
from ilm_dist.paths import check_output_dir
from ilm_dist.serialization import CheckpointWriteError
from ilm_dist.train.preflight import preflight


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def pretrain_parser() -> ArgumentParser:
    parser = ArgumentParser(description="MoCo v2 + intermediate-layer pretraining")
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds an earlier run, deleting that run's files",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue although the data or a run-defining setting (model, moco, loss, aug, optim, "
        "seed, data split or size) differs from the run's; recorded in output_dir/resume_changes.jsonl",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20")
    return parser


def pretrain_main(argv: list[str] | None = None) -> None:
    parser = pretrain_parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in output_dir, --overwrite deletes it: give one")
    if args.allow_changes and not args.resume:
        parser.error("--allow-changes applies to --resume only")
    setup_logging()
    with exit_on_input_error():
        cfg, manifest = preflight(args.config, args.overrides)
        check_output_dir(cfg.output_dir, "output_dir")
    from ilm_dist.train.trainer import Trainer
    from ilm_dist.train.validation import ValidationLoss

    validators = []
    if cfg.monitor.every:  # imported only then: scikit-learn adds ~3 s to every rank's start
        from ilm_dist.eval.monitor import KnnMonitor

        validators.append(KnnMonitor.builder(cfg))
    if cfg.val.every:
        validators.append(ValidationLoss.builder(cfg))
    try:
        trainer = Trainer(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            validators=validators,
            allow_changes=args.allow_changes,
            manifest=manifest,
        )
    except InputError as err:  # raised alike on every rank (rank 0's decisions are shared by on_main)
        shutdown()
        fail(str(err))
    code = run_guarded(trainer)
    if code == 0:  # after a failure the group may wait on a dead rank; the launcher ends the process
        shutdown()
    sys.exit(code)


class Terminated(Exception):
    """SIGTERM arrived: the launcher or the scheduler is stopping this rank."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def run_guarded(trainer) -> int:
    """Train; turn a non-finite loss or a lost rank into one clear line naming rank, step and culprit."""
    from ilm_dist.train.health import NonFiniteLoss

    log = logging.getLogger("ilm_dist")
    rank, world = trainer.info.rank, trainer.info.world_size
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        trainer.fit()
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    except NonFiniteLoss as err:
        latest = trainer.run.latest_tag()
        log.error("rank %d/%d: %s; stopped, last good checkpoint: %s", rank, world, err, latest or "none")
        return 3
    except (RuntimeError, Terminated) as err:
        if world == 1 and not isinstance(err, Terminated):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the diagnosis short
        step = trainer.global_step
        if world == 1:  # no launcher: a scheduler, `timeout` or a user stopped it
            log.error(
                "stopped at step %d: %s (by a scheduler, timeout or kill); last checkpoint: %s",
                step,
                err,
                trainer.run.latest_tag() or "none",
            )
            return 4
        cause = " (the launcher stops the other ranks when one exits)" if isinstance(err, Terminated) else ""
        log.error(
            "rank %d/%d stopped at step %d: %s%s; %s",
            rank,
            world,
            step,
            str(err).splitlines()[0],
            cause,
            trainer.heartbeat.diagnose(step),
        )
        return 4
    return 0


if __name__ == "__main__":
    pretrain_main()

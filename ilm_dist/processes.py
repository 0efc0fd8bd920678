"""Commands run as child processes: one process or the ``deepspeed`` launcher, stopped with their parent.

Sweep trials (:mod:`ilm_dist.tune.trial`) and experiment cells (:mod:`ilm_dist.experiment`) run the
package's commands (``python -m ilm_dist.pretrain``, ``python -m ilm_dist.eval ...``) this way: with
one rank as ``python -m``, with more through ``deepspeed --module`` (``DS_ACCELERATOR=cpu`` without
GPUs), each in its own process group that is terminated when the caller leaves, and with
``setpriv --pdeathsig`` where it exists, so the command dies with its parent even when the parent is
killed outright.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ilm_dist.config import ConfigError
from ilm_dist.cpu_placement import THREADS_ENV, available_cores
from ilm_dist.distributed import free_port

STOP_GRACE_S = 10.0


@dataclass
class ResourcesConfig:
    cpus: float = 1.0  # per command (a trial, a cell): its threads, and what Ray reserves for it
    gpus: float = 0.0  # per command; a fraction < 1 shares a GPU between commands
    ranks: int | None = None  # DeepSpeed ranks per command; None: one per GPU, else 1

    @property
    def num_ranks(self) -> int:
        return self.ranks or max(1, int(self.gpus))

    def check(self, prefix: str) -> None:
        """Raise :class:`ConfigError` naming ``<prefix>.<key>`` for the first impossible value."""
        checks = [
            (self.cpus > 0, "cpus", "must be > 0"),
            (self.gpus >= 0, "gpus", "must be >= 0"),
            (self.gpus < 1 or float(self.gpus).is_integer(), "gpus", "a whole number, or a fraction < 1"),
            (self.ranks is None or self.ranks >= 1, "ranks", "must be >= 1"),
            (
                self.gpus == 0 or self.ranks in (None, max(1, int(self.gpus))),
                "ranks",
                "with GPUs, one rank per GPU (leave it unset)",
            ),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: {message}")


def module_command(
    module_args: Sequence[str], resources: ResourcesConfig
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment running ``python -m <module_args>`` on ``resources``: one process,
    or ``deepspeed --module`` with ``num_ranks`` ranks (CPU ranks when ``gpus`` is 0; with GPUs, the
    launcher takes ``CUDA_VISIBLE_DEVICES`` as it is, e.g. as Ray set it). A command given the whole
    machine places its ranks itself (:mod:`ilm_dist.cpu_placement`); one given a share of it
    (``cpus`` below the cores) gets ``OMP_NUM_THREADS`` = its share per rank, unless the caller set one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if resources.cpus < len(available_cores()):  # a share of the machine: threads, the binding left to Ray
        env.setdefault(THREADS_ENV, str(max(1, int(resources.cpus // resources.num_ranks))))
    if resources.num_ranks == 1:
        cmd = [sys.executable, "-m", *module_args]
    else:
        deepspeed = [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(free_port())]
        if resources.gpus == 0:
            env["DS_ACCELERATOR"] = "cpu"
            deepspeed += ["--num_gpus", str(resources.num_ranks)]
        cmd = [*deepspeed, "--module", *module_args]
    if shutil.which("setpriv"):  # the command dies with its parent even when that is killed outright
        cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
    return cmd, env


@contextlib.contextmanager
def launch(
    cmd: Sequence[str], env: dict[str, str], cwd: Path, log: IO[bytes], pass_fds: Sequence[int] = ()
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group with its output in ``log``; terminate the group on the way
    out. ``pass_fds``: descriptors the command inherits (e.g. a lock that must outlive the caller)."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it has not exited within the grace time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def last_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` non-empty lines of a log (progress-bar carriage returns split lines too)."""
    text = path.read_bytes()[-20000:].decode(errors="replace").replace("\r", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()][-n:]

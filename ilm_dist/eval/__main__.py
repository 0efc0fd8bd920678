"""``python -m ilm_dist.eval {finetune,probe,analyse} ARGS``: the evaluation commands of an installed package.

The same commands as ``launch/finetune.py``, ``launch/probe.py``, ``launch/analyse.py`` (and ``ilm-finetune``,
...); under the launcher: ``deepspeed --module ilm_dist.eval finetune ARGS``.
"""

from __future__ import annotations

import sys

from ilm_dist.errors import fail
from ilm_dist.eval.commands import analyse_main, finetune_main, probe_main

COMMANDS = {"finetune": finetune_main, "probe": probe_main, "analyse": analyse_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        fail(f"python -m ilm_dist.eval: expected a command, one of {', '.join(COMMANDS)}, then its options")
    sys.argv[0] = f"python -m ilm_dist.eval {argv[0]}"  # the program name in usage messages
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()

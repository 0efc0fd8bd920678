"""Reading and writing tensor files safely: nothing in a file from another person runs code, and a full disk
never leaves a half-written file behind.

Every ``.pt`` file ilm_dist reads (exported backbones, torchvision state_dicts, DeepSpeed checkpoints,
resumed checkpoints) goes through :func:`load_tensors`: ``torch.load(weights_only=True)``, which unpickles
only tensors, plain containers and the few allow-listed types below. A file that holds anything else
(a pickled function call such as ``os.system``) is refused, naming the file and the refused object.

The allow-list is what DeepSpeed 0.19 stores in its ZeRO optimizer files (checked with
``torch.serialization.get_unsafe_globals_in_checkpoint``): plain data classes and enums, no callables.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

from ilm_dist.errors import InputError

# torch names the refused object in one of two forms, "Unsupported global: GLOBAL os.system" or
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
_REFUSED = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)
_BOILERPLATE = (
    "Weights only load failed",
    "Please file an issue",
    "Check the documentation",
    "WeightsUnpickler",
)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (typically a full disk); the message names the file and the OS error."""

    def __str__(self) -> str:
        return str(self.strerror)


def _deepspeed_safe_globals() -> list[type]:
    """DeepSpeed's own plain types found in its checkpoint files (empty when DeepSpeed is not installed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def load_tensors(path: str | Path, what: str = "tensor file", deepspeed: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, also allowing DeepSpeed's plain types when
    ``deepspeed``; a refused or unreadable file raises :class:`InputError` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals() if deepspeed else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and storage errors come in many types
        raise InputError(f"{path}: {_reason(err, what)}") from None


def _reason(err: Exception, what: str) -> str:
    text = str(err)
    refused = _REFUSED.search(text)
    if refused:
        return (
            f"refused to load this {what}: it contains the Python object {refused.group(1)}, which could run "
            "code; only tensors and plain data are loaded (torch.load weights_only=True)"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith(_BOILERPLATE)), type(err).__name__)
    return f"cannot read this {what} (truncated, or not a file written by torch.save): {first}"


def save_tensors(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a Python file, so a failed write raises an ``OSError`` with its errno, then
    re-raised as :class:`CheckpointWriteError` naming ``path``; the partial file is removed."""
    path = Path(path)
    try:
        with open(path, "wb") as file:
            torch.save(obj, file)
    except OSError as err:
        with contextlib.suppress(OSError):
            path.unlink()
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise CheckpointWriteError(err.errno or errno.EIO, f"{path}: {reason}") from None

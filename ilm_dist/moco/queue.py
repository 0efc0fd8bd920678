"""The negative-key queue (He et al. 2020, Sec. 3.1).

Every rank enqueues the same all-gathered global batch at the same pointer, so the queues stay
identical without further communication. Any queue size works: a batch that runs past the end
wraps around to the front (the official code instead asserts ``K % batch == 0``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor


class KeyQueue:
    def __init__(self, size: int, dim: int, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        # Random unit vectors until real keys arrive (as in the official code).
        self.keys = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys [N, dim]`` at the pointer, wrapping; the i-th key ever written lives in slot i % size."""
        n = keys.shape[0]
        kept = keys.detach().to(self.keys.dtype)[
            -self.size :
        ]  # older keys of a batch > size are overwritten anyway
        start = self.ptr + n - kept.shape[0]
        self.keys[(start + torch.arange(kept.shape[0], device=self.keys.device)) % self.size] = kept
        self.ptr = (self.ptr + n) % self.size

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if state["keys"].shape != self.keys.shape:
            raise ValueError(
                f"queue in checkpoint has shape {tuple(state['keys'].shape)}, config wants {tuple(self.keys.shape)}"
            )
        self.keys.copy_(state["keys"])
        self.ptr = int(state["ptr"])

    def checksum(self) -> str:
        """sha256 of the queue's bytes and pointer: equal on every rank when they agree exactly."""
        digest = hashlib.sha256(self.keys.detach().float().cpu().numpy().tobytes())
        digest.update(str(self.ptr).encode())
        return digest.hexdigest()

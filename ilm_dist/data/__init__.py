"""Data backends behind one factory signature:
``(data: DataConfig, aug: AugConfig, where: Placement, manifest: Manifest | None) -> PretrainLoader``
(``manifest``: the packed set's, loaded once by the caller; None for the synthetic backend);
:data:`ilm_dist.config.DATA_BACKENDS` names each one's class (the config checks ``data.backend`` against it)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable

import torch

from ilm_dist.config import AUTO_BACKEND, DATA_BACKENDS, AugConfig, DataConfig
from ilm_dist.data.batch import Placement, PretrainLoader, TwoViewBatch
from ilm_dist.data.integrity import check_split_content
from ilm_dist.data.manifest import Manifest

log = logging.getLogger("ilm_dist")


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` means DALI on a GPU when DALI is installed, else the torch DataLoader."""
    if requested != AUTO_BACKEND:
        return requested
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    return "dali" if device.type == "cuda" and has_dali else "torch"


def backend_factory(name: str) -> Callable[..., PretrainLoader]:
    module, _, attr = DATA_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_pretrain_loader(
    data: DataConfig, aug: AugConfig, where: Placement, manifest: Manifest | None
) -> PretrainLoader:
    """The loader ``data.backend`` names (``auto``: see :func:`resolve_backend`) for this rank, over the
    packed set of ``manifest`` (None: ``data.backend=synthetic``)."""
    name = resolve_backend(data.backend, where.device)
    if name != "synthetic":  # a packed split: before any step, it holds what its manifest promises
        check_split_content(manifest, data.split, data.verify_sha256)
    loader = backend_factory(name)(data, aug, where, manifest)
    log.info("data backend %s (data.backend=%s): %s", name, data.backend, loader.description)
    return loader


__all__ = [
    "Placement",
    "PretrainLoader",
    "TwoViewBatch",
    "build_pretrain_loader",
    "resolve_backend",
]

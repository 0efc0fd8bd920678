"""An evaluation context of randomly initialised ResNet-18 weights on a packed set, in this process (CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from ilm_dist.eval.context import EvalContext, EvalTarget, open_context
from tests.launcher import REPO

DEMO = REPO / "configs" / "demo.yaml"


def random_context(data: Path, out: Path) -> EvalContext:
    """``--weights random --config configs/demo.yaml`` at 32 px over ``data``, results in ``out``."""
    overrides = [f"data.shards={data}", "data.image_size=32", "model.arch=resnet18"]
    return open_context(EvalTarget("random", str(out), str(DEMO), overrides=overrides), torch.device("cpu"))

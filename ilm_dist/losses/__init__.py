"""InfoNCE and the intermediate-layer losses; importing the package registers the built-in ones (the
run config's ``loss.plugins`` imports others)."""

# the built-in losses register in this order (loss.type values: none, mse, bt)
from ilm_dist.losses import mse  # isort: split

from ilm_dist.losses import barlow_twins
from ilm_dist.losses.intermediate import (
    INTERMEDIATE_LOSSES,
    NO_LOSS,
    IntermediateLoss,
    build_intermediate_loss,
    import_loss_modules,
    loss_types,
    register_intermediate_loss,
)

__all__ = [
    "INTERMEDIATE_LOSSES",
    "NO_LOSS",
    "IntermediateLoss",
    "barlow_twins",
    "build_intermediate_loss",
    "import_loss_modules",
    "loss_types",
    "mse",
    "register_intermediate_loss",
]

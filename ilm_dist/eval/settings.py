"""The settings of the evaluation commands: fine-tuning, probing and CKA.

Each is a dataclass whose fields are the command's options (:mod:`ilm_dist.options`) and the values an
evaluation protocol's section may set (:mod:`ilm_dist.eval.protocol`). Fine-tuning and probing share
the fields of the supervised loop (:class:`FitSettings`, read by :mod:`ilm_dist.eval.fit`). A leaf of
``ilm_dist.eval``: it imports only the CKA defaults, so every other evaluation module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ilm_dist.eval.cka import NUM_SUBSETS, RBF_SIGMA, SUBSET_SIZE
from ilm_dist.options import check_bounds, option

ADAM_LR = 1e-3  # official fine-tuning and probing code

FIT_HELP = {
    "epochs": ("passes over the labelled images", {"min": 1}),
    "min_steps": ("at least this many optimizer steps (small label fractions)", {"min": 0}),
    "batch_size": ("training batch (global: split evenly over the ranks)", {"min": 1}),
    "lr": ("Adam learning rate (official: 1e-3)", {"above": 0}),
    "evals": ("validation checks over the run (model selection on the val split)", {"min": 1}),
    "eval_each_epoch": ("validate after every epoch (official) instead of --evals checks over the run", {}),
    "select": ("val metric that selects the model (default: the task's primary metric)", {}),
    "report": ("headline test metric of the results and the report (default: the task's primary)", {}),
    "ci": ("95%% CIs: percentile bootstrap, or the official mean +- 1.96 std / sqrt(resamples)", {}),
    "train_aug": (
        "training views: the run's MoCo augmentations, the protocol's for the dataset, or none",
        {},
    ),
    "frozen_bn": (
        "BatchNorm of the frozen backbone (--mode linear, probing): eval keeps its statistics, train "
        "normalises with batch statistics and updates them (official)",
        {},
    ),
    "seed": ("label subsets, shuffling, augmentation, bootstrap", {}),
    "n_boot": ("bootstrap resamples of the test split for the 95%% CIs (0: none)", {"min": 0}),
}


def fit_option(name: str, default: Any) -> Any:
    """A field of the supervised-training settings shared by fine-tuning and probing (help, bounds)."""
    help, bounds = FIT_HELP[name]
    flag = "--bootstrap" if name == "n_boot" else None
    return field(default=default, metadata=option(help, flag=flag, **bounds))


@dataclass
class FitSettings:
    """What fine-tuning and probing share: the supervised loop, its training views, selection and CIs."""

    epochs: int = fit_option("epochs", 10)
    min_steps: int = fit_option("min_steps", 0)
    batch_size: int = fit_option("batch_size", 64)
    lr: float = fit_option("lr", ADAM_LR)
    evals: int = fit_option("evals", 10)
    eval_each_epoch: bool = fit_option("eval_each_epoch", False)
    train_aug: Literal["moco", "protocol", "none"] = fit_option("train_aug", "moco")
    frozen_bn: Literal["eval", "train"] = fit_option("frozen_bn", "eval")
    select: str | None = fit_option("select", None)
    report: str | None = fit_option("report", None)
    seed: int = fit_option("seed", 0)
    n_boot: int = fit_option("n_boot", 1000)
    ci: Literal["percentile", "official"] = fit_option("ci", "percentile")
    # set by an evaluation protocol, not a flag: AugConfig fields over the run's aug (train_aug=protocol)
    aug: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class FinetuneSettings(FitSettings):
    mode: Literal["full", "linear"] = field(
        default="full", metadata=option("train all layers, or the new linear layer only (frozen backbone)")
    )


@dataclass
class ProbeSettings(FitSettings):
    epochs: int = fit_option("epochs", 100)
    batch_size: int = fit_option("batch_size", 256)
    evals: int = fit_option("evals", 20)
    train_aug: Literal["moco", "protocol", "none"] = fit_option("train_aug", "none")
    fraction: float = field(
        default=1.0,
        metadata=option(
            "labelled fraction of the train split (a saved subset, as for fine-tuning)", above=0, max=1
        ),
    )
    standardise: bool = field(
        default=True,
        metadata=option("standardise the cached features with the train mean/std (official: raw features)"),
    )

    @property
    def live(self) -> bool:
        """Whether the backbone must run at every step (train-mode BatchNorm or augmented views)."""
        return self.frozen_bn == "train" or self.train_aug != "none"


@dataclass(frozen=True)
class CkaParams:
    num_subsets: int = field(
        default=NUM_SUBSETS,
        metadata=option("RBF CKA: random test subsets (official: 50)", flag="--cka-subsets", min=1),
    )
    subset_size: int = field(
        default=SUBSET_SIZE,
        metadata=option("RBF CKA: images per subset (official: 1000)", flag="--cka-subset-size", min=2),
    )
    sigma: float = field(default=RBF_SIGMA, metadata=option("RBF kernel width", flag="--rbf-sigma", above=0))
    absolute_sigma: bool = field(
        default=False,
        metadata=option(
            "sigma on raw distances, as the official code (default: sigma x median distance)",
            flag="--rbf-absolute",
        ),
    )
    seed: int = field(default=0, metadata=option("seed of the CKA subsets"))

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def relative(self) -> bool:
        """Sigma scaled by the median pairwise distance (Kornblith et al. 2019), not absolute."""
        return not self.absolute_sigma

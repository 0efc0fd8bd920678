"""Initial weights for evaluation: an SSL run's backbone, a DeepSpeed checkpoint, a torchvision file, or none.

Accepted ``--weights`` values:

- ``random``: a freshly initialised ResNet (the supervised-from-scratch baseline);
- a pretraining run directory (``backbone.pt`` + ``config.yaml``, written by ``launch/pretrain.py``);
- ``backbone.pt`` or any torchvision-format ``state_dict`` file (``fc.*`` is ignored);
- a DeepSpeed checkpoint: ``<run>/checkpoints`` (its ``latest`` tag), ``<run>/checkpoints/step_N``, or the
  ``mp_rank_00_model_states.pt`` file in it. The query encoder's backbone (``encoder.backbone.*``) is read
  as the engine kept it: fp32 (the 16-bit engine configs only compute under autocast), the values of
  ``backbone.pt``.

Weights that do not fit the architecture raise :class:`EvalError` naming the file and the first
mismatching tensors (and the architecture the file looks like); weights of the other stem (``model.stem``,
told apart by ``conv1``'s kernel) name both stems.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ilm_dist.config import Stem
from ilm_dist.eval.errors import EvalError
from ilm_dist.model.encoder import STEM_KERNELS, build_resnet
from ilm_dist.serialization import load_tensors
from ilm_dist.train.run_dir import RunDir

DS_MODEL_STATES = "mp_rank_00_model_states.pt"
DS_BACKBONE_PREFIX = "encoder.backbone."
# torchvision ResNets by blocks per stage and block type (He et al. 2016, Table 1)
KNOWN_LAYOUTS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


@dataclass(frozen=True)
class InitSpec:
    """Where initial weights come from; ``run_config`` is the ``config.yaml`` of the run that wrote them."""

    spec: str
    kind: str  # "random" | "state_dict" | "deepspeed"
    path: Path | None = None
    run_config: Path | None = None

    def describe(self) -> dict[str, str | None]:
        """Identity of the weights: their kind and resolved file (not how ``--weights`` spelled it)."""
        return {"kind": self.kind, "path": str(self.path.resolve()) if self.path else None}


def resolve_init(spec: str) -> InitSpec:
    """Interpret a ``--weights`` value (see the module docstring)."""
    if spec == "random":
        return InitSpec(spec, "random")
    path = Path(spec)
    if path.is_dir():
        return _resolve_dir(spec, path)
    if not path.is_file():
        raise EvalError(f"--weights {spec}: no such file or directory (or 'random')")
    if path.name == DS_MODEL_STATES:
        return InitSpec(spec, "deepspeed", path, _config_beside(path.parent.parent.parent))
    return InitSpec(spec, "state_dict", path, _config_beside(path.parent))


def _resolve_dir(spec: str, path: Path) -> InitSpec:
    folder = RunDir(path)
    if folder.backbone.is_file():
        return InitSpec(spec, "state_dict", folder.backbone, _config_beside(path))
    if (path / DS_MODEL_STATES).is_file():
        return InitSpec(spec, "deepspeed", path / DS_MODEL_STATES, _config_beside(path.parent.parent))
    for root, run in ((path, path.parent), (folder.checkpoints, path)):  # checkpoints/, or its run
        latest = root / RunDir.LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (root / tag / DS_MODEL_STATES).is_file():
                raise EvalError(f"{latest} names tag {tag!r}, but {root / tag / DS_MODEL_STATES} is missing")
            return InitSpec(spec, "deepspeed", root / tag / DS_MODEL_STATES, _config_beside(run))
    raise EvalError(
        f"--weights {spec}: directory has no {RunDir.backbone.name}, no DeepSpeed checkpoint "
        f"({DS_MODEL_STATES}) and no {RunDir.checkpoints.name}/{RunDir.LATEST}"
    )


def _config_beside(directory: Path) -> Path | None:
    """The ``config.yaml`` of the run in ``directory``, if there is one."""
    path = RunDir(directory).config
    return path if path.is_file() else None


def load_state(init: InitSpec) -> dict[str, Tensor] | None:
    """The backbone ``state_dict`` under torchvision names (``None`` for random init)."""
    if init.kind == "random":
        return None
    if init.kind == "deepspeed":
        states = load_tensors(init.path, "DeepSpeed checkpoint file", deepspeed=True)
        module = states.get("module", {}) if isinstance(states, dict) else {}
        state = {
            k[len(DS_BACKBONE_PREFIX) :]: v for k, v in module.items() if k.startswith(DS_BACKBONE_PREFIX)
        }
        if not state:
            raise EvalError(
                f"{init.path}: no '{DS_BACKBONE_PREFIX}*' weights (not an ilm_dist pretraining checkpoint)"
            )
    else:
        state = load_tensors(init.path, "torch state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise EvalError(f"{init.path}: not a state_dict (a flat mapping of parameter names to tensors)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("fc.")}


def build_classifier(
    arch: str, state: dict[str, Tensor] | None, num_outputs: int, source: str, stem: Stem = "imagenet"
) -> nn.Module:
    """A torchvision ResNet with ``stem``, ``state`` loaded (random when ``None``) and a fresh ``fc`` of
    ``num_outputs``."""
    model = build_resnet(arch, stem=stem)
    if state is not None:
        check_fits(model, state, arch, source)
        model.load_state_dict(state, strict=False)
    model.fc = nn.Linear(model.fc.in_features, num_outputs)
    return model


def check_fits(model: nn.Module, state: dict[str, Tensor], arch: str, source: str) -> None:
    file_stem, model_stem = stem_of(state), stem_of(model.state_dict())
    if file_stem is not None and file_stem != model_stem:
        raise EvalError(
            f"{source}: weights of model.stem={file_stem} ({STEM_KERNELS[file_stem]}x{STEM_KERNELS[file_stem]} "
            f"conv1), the run config has model.stem={model_stem}; evaluate them with the config of the run "
            f"that wrote them, or pass model.stem={file_stem}"
        )
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    if missing or unexpected or shapes:
        guess = guess_arch(state)
        looks = f"; the file looks like {guess}" if guess and guess != arch else ""
        raise EvalError(
            f"{source}: weights do not fit {arch}{looks} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape file vs model {shapes[:2]})"
        )


def stem_of(state: dict[str, Tensor]) -> str | None:
    """The stem whose ``conv1`` kernel ``state`` holds (:data:`~ilm_dist.model.encoder.STEM_KERNELS`), if any."""
    conv1 = state.get("conv1.weight")
    by_kernel = {kernel: stem for stem, kernel in STEM_KERNELS.items()}
    return by_kernel.get(conv1.shape[-1]) if conv1 is not None and conv1.dim() == 4 else None


def guess_arch(state: dict[str, Tensor]) -> str | None:
    """Name the standard ResNet whose block layout matches ``state``'s keys, if any."""
    counts = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(max(blocks) + 1 if blocks else 0)
    bottleneck = any(".conv3." in k for k in state)
    return KNOWN_LAYOUTS.get((tuple(counts), bottleneck))


def fingerprint(module: nn.Module, skip_prefix: str = "fc.", buffers: bool = True) -> str:
    """SHA-256 over every parameter and buffer (BN running statistics included; parameters only without
    ``buffers``) except those named ``skip_prefix``..."""
    sha = hashlib.sha256()
    tensors = module.state_dict() if buffers else dict(module.named_parameters())
    for name, tensor in sorted(tensors.items()):
        if name.startswith(skip_prefix):
            continue
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def assert_unchanged(module: nn.Module, before: str, what: str, buffers: bool = True) -> None:
    """Fail loudly when a frozen backbone's weights or (with ``buffers``) BN statistics moved."""
    if fingerprint(module, buffers=buffers) != before:
        moved = "weights or BatchNorm statistics" if buffers else "weights"
        raise RuntimeError(f"{what}: the frozen backbone changed ({moved}); this is a bug")

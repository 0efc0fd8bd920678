"""Typed run configuration: YAML files + dotted ``key=value`` overrides -> validated dataclasses.

A config file may name ``base:`` files (a path or a list, relative to itself) whose values it
overrides; presets (``configs/presets/*.yaml``) and dataset defaults are shared that way.
A key given twice in one file (two ``train:`` blocks) is an error naming the file, line and key.
Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key,
before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ilm_dist.cpu_placement import CpuConfig
from ilm_dist.errors import ConfigError
from ilm_dist.losses import INTERMEDIATE_LOSSES, import_loss_modules, loss_types
from ilm_dist.paths import check_name
from ilm_dist.strict import load_yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
PATH = {"path": True}  # field metadata: a file or directory, relative to the file that names it
BLOCKS = (1, 2, 3, 4)
Stem = Literal["imagenet", "small"]  # ilm_dist.model.encoder: torchvision's stem or the CIFAR-scale one


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any torchvision ResNet
    # imagenet: torchvision's 7x7 stride-2 conv + max-pool; small: a 3x3 stride-1 conv, no max-pool
    stem: Stem = "imagenet"
    zero_init_residual: bool = True  # official code (Kaku et al.) and Goyal et al. 2017
    channels_last: bool = False  # NHWC inputs, loader layout and key encoder; the engine's weights stay NCHW


@dataclass
class MocoConfig:
    dim: int = 128  # embedding dimension (He et al. 2020)
    mlp: bool = True  # 2-layer MLP head (Chen et al. 2020, MoCo v2)
    queue_size: int = 65536  # K negatives (He et al. 2020)
    momentum: float = 0.999  # key-encoder EMA (He et al. 2020)
    temperature: float = 0.2  # MoCo v2; the official ILM code uses 0.07
    shuffle_bn: bool = True  # shuffle keys across ranks before the key encoder (He et al. 2020, Sec. 3.3)
    sync_bn: bool = False  # SyncBatchNorm in the query encoder instead


def _loss_options() -> dict[str, Any]:
    return {name: loss.Config() for name, loss in INTERMEDIATE_LOSSES.items()}


@dataclass
class LossConfig:
    """The intermediate loss: ``type`` (``none`` or a registered loss), the blocks it applies to and their
    weights; each registered loss's own options are a section ``loss.<name>`` (``loss.mse``, ``loss.bt``),
    held in ``options`` and read as attributes (:mod:`ilm_dist.losses.intermediate`).

    ``plugins`` names modules outside the package (importable: installed, or on ``PYTHONPATH``) that
    register more losses; loading the config imports them first, so every process that reads it (each
    rank, sweep trial, experiment cell and evaluation) knows their types and sections. Importing runs the
    module's code, as naming it asks."""

    type: str = "none"
    plugins: list[str] = field(default_factory=list)  # e.g. [my_losses]: then loss.type=<its loss's name>
    blocks: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    weights: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])  # one per block
    options: dict[str, Any] = field(default_factory=_loss_options)

    @staticmethod
    def sections() -> dict[str, type]:
        """The sections beside the fields: one per registered loss, its ``Config``."""
        return {name: loss.Config for name, loss in INTERMEDIATE_LOSSES.items()}

    @staticmethod
    def register_sections(raw: dict[str, Any], prefix: str) -> None:
        """Import the modules ``raw`` names in ``plugins``, whose losses then have sections."""
        key = f"{prefix}plugins"
        import_loss_modules(_coerce(list[str], raw.get("plugins", []), key), key)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"LossConfig has no field or loss section {name!r}")


@dataclass
class AugConfig:
    """MoCo v2 augmentations (Chen et al. 2020) with the ILM code's per-dataset choices."""

    crop_scale: list[float] | None = field(default_factory=lambda: [0.2, 1.0])  # None: resize only
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # SimCLR (Chen et al. 2020)
    hflip: bool = True
    vflip: bool = False
    rotation: float = 0.0  # degrees; 30 for chest X-ray and DR in the official code
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class SyntheticDataConfig:
    num_samples: int = 4096
    num_classes: int = 8


@dataclass
class DaliConfig:
    """Options of the DALI backend (``ilm_dist.data.dali_backend``)."""

    skip_bad: bool = False  # scan shards at start-up, drop samples with a missing part or undecodable JPEG
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the A100/H100 hardware decoder (DALI's default)
    prefetch: int = 2  # batches prepared ahead (pipeline prefetch_queue_depth)


# the data.backend values besides "auto" (ilm_dist.data.resolve_backend), each naming its loader class, which
# a rank imports only when it builds that loader (ilm_dist.data.build_pretrain_loader)
DATA_BACKENDS: dict[str, str] = {
    "torch": "ilm_dist.data.torch_backend:TorchLoader",
    "synthetic": "ilm_dist.data.random_backend:RandomTensorLoader",
    "dali": "ilm_dist.data.dali_backend:DaliLoader",
}
AUTO_BACKEND = "auto"


@dataclass
class DataConfig:
    backend: str = AUTO_BACKEND  # "auto" or a name in DATA_BACKENDS
    shards: str | None = field(default=None, metadata=PATH)  # directory written by data_tools.pack
    split: str = "train"
    image_size: int = 224
    batch_size: int = 32  # per rank
    num_workers: int = 4
    shuffle_buffer: int = 2048
    # hash the split's shards against manifest.json at start-up (ilm_dist/data/integrity.py)
    verify_sha256: bool = True
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    dali: DaliConfig = field(default_factory=DaliConfig)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.03  # for a global batch of 256 (He et al. 2020), scaled by batch/256
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    max_steps: int | None = None
    epochs: int = 1
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    # torch deterministic algorithms (CPU tests; slower on GPU); on CUDA also CUBLAS_WORKSPACE_CONFIG=:4096:8
    deterministic: bool = False
    # backbone.pt: the last step's backbone, or the one with the best validation value (needs val.every)
    export: Literal["last", "best"] = "last"


@dataclass
class EngineConfig:
    deepspeed_config: str | None = field(default=None, metadata=PATH)  # DeepSpeed JSON; None: fp32, no ZeRO
    # auto: nccl on CUDA, else gloo; nccl without CUDA is an error (not a CPU run)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    collective_timeout_s: int = 600  # a rank that stops answering fails the job after this long
    # "auto": bf16 autocast on CPU ranks whose CPU has AMX, where the DeepSpeed config sets no autocast
    cpu_autocast: Literal["none", "auto"] = "none"


@dataclass
class MonitorConfig:
    """Online kNN monitor during pretraining (``ilm_dist.eval.monitor.KnnMonitor``), rank 0 only."""

    every: int = 0  # optimizer steps between checks; 0: off
    k: int = 20  # neighbours
    temperature: float = 0.07  # vote weight exp(sim / T) (Wu et al. 2018)
    max_bank: int = 4096  # labelled neighbours drawn from split_bank (seeded, fixed across checks)
    max_val: int = 1024  # queries drawn from split_val
    split_bank: str = "train"
    split_val: str = "val"
    batch_size: int = 256
    num_workers: int = 0


@dataclass
class ValConfig:
    """Validation loss during pretraining (``ilm_dist.train.validation.ValidationLoss``), on every rank.

    The loss of the training objective on ``split``, read from the query encoder, the key encoder and the
    queue in eval mode without changing any of them; the best value's backbone is kept (``train.export``).
    """

    every: int = 0  # optimizer steps between checks, and a check at the last step; 0: off
    split: str = "val"
    max_samples: int | None = None  # a seeded draw of this many samples; None: the whole split
    # augmented: two training views, seeded per sample (the same at every check); eval: the evaluation
    # view as both query and key (the official code's validation transform)
    views: Literal["augmented", "eval"] = "augmented"
    # the value that selects the best backbone: the total loss (official val_loss) or InfoNCE alone
    select: Literal["loss", "moco"] = "loss"
    num_workers: int = 0


@dataclass
class RunConfig:
    name: str = "run"  # a name (ilm_dist.paths.NAME_RULE): an evaluation's EVAL_DIR/<name> by default
    seed: int = 0
    output_dir: str = field(default="runs/run", metadata=PATH)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    val: ValConfig = field(default_factory=ValConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load ``path`` (with its ``base:`` chain), apply ``key=value`` overrides, build and validate.

    A relative path value (``output_dir``, ``data.shards``, ``engine.deepspeed_config``, ``base:``) is
    relative to the config file that names it; in an override or a default, to the working directory.
    The loaded config holds absolute paths, so its saved copy means the same wherever it is read.
    """
    raw = load_yaml_chain(Path(path)) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    _resolve_paths(raw, Path.cwd())
    cfg = from_dict(RunConfig, raw)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_yaml_chain(
    path: Path, path_keys: Sequence[str] | None = None, seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` merged over its ``base:`` files (relative to it, recursively);
    the values of ``path_keys`` (dotted; default: the run config's :data:`PATH` fields) are made absolute
    against the folder of the file that names them."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml_mapping(path, "the config file")
    bases = data.pop("base", []) or []
    _resolve_paths(data, path.parent, path_keys)
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_merge(merged, load_yaml_chain(path.parent / base, path_keys, (*seen, path)))
    _deep_merge(merged, data)
    return merged


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` ({} when empty); a one-line :class:`ConfigError`
    naming the file (``what``: e.g. "the sweep file") when it cannot be read, is not YAML or not a mapping."""
    try:
        data = load_yaml(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {what} is not valid YAML ({_yaml_problem(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, what, and while doing what."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f", {context}" if context else "")


def path_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted names of the fields marked :data:`PATH` in ``cls`` (default :class:`RunConfig`) and its sections."""
    cls = cls or RunConfig
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get("path"):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(tp):
            keys += path_keys(tp, f"{prefix}{f.name}.")
    return keys


def format_override(key: str, value: Any) -> str:
    """``key=value`` that :func:`load_config` parses back to ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()
    return f"{key}={text}"


def format_overrides(values: dict[str, Any]) -> list[str]:
    """``{key: value}`` as ``key=value`` strings that :func:`load_config` parses back."""
    return [format_override(key, value) for key, value in values.items()]


def absolute_overrides(overrides: list[str], directory: Path) -> list[str]:
    """``overrides`` with their relative path values made absolute against ``directory`` (the directory of
    the file that names them), so they mean the same from any working directory."""
    keys, out = set(path_keys()), []
    for item in overrides:
        key, value = parse_override(item)
        if key in keys and isinstance(value, str):
            item = format_override(key, str((directory / Path(value).expanduser()).resolve()))
        out.append(item)
    return out


def _resolve_paths(raw: dict[str, Any], directory: Path, keys: Sequence[str] | None = None) -> None:
    """Make the relative path values of ``keys`` (default: the run config's) in ``raw`` absolute, against
    ``directory``."""
    for key in path_keys() if keys is None else keys:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = str((directory / Path(node[leaf]).expanduser()).resolve())


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=20")
    try:
        return key.strip(), load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
    node[leaf] = value


# --------------------------------------------------------------------------- typed construction


def section_fields(cls: type) -> dict[str, Any]:
    """The keys a config section accepts and their types: its fields, and for a section with
    ``sections()`` (:class:`LossConfig`) the registered sub-sections in place of ``options``."""
    hints = typing.get_type_hints(cls)
    if not hasattr(cls, "sections"):
        return hints
    return {k: v for k, v in hints.items() if k != "options"} | cls.sections()


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    if hasattr(cls, "register_sections"):
        cls.register_sections(raw, prefix)
    fields = section_fields(cls)
    for key in raw:
        if key not in fields:
            names = list(fields)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {key: _coerce(fields[key], value, f"{prefix}{key}") for key, value in raw.items()}
    if hasattr(cls, "sections"):
        defaults = {name: section() for name, section in cls.sections().items()}
        kwargs["options"] = defaults | {name: kwargs.pop(name) for name in defaults if name in kwargs}
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """A config as plain dicts and lists, in the shape :func:`from_dict` reads (sections inlined)."""
    if dataclasses.is_dataclass(obj):
        plain = {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(obj, "sections"):
            plain |= plain.pop("options")
        return plain
    if isinstance(obj, dict):
        return {key: to_plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(value) for value in obj]
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> None:
    """Check values that are well-typed but impossible; names the key in the error."""
    check_name(cfg.name, "name")
    _check(
        cfg.model.arch.startswith(("resnet", "resnext", "wide_resnet")),
        "model.arch",
        f"{cfg.model.arch!r} is not a torchvision ResNet (resnet18/34/50/101/152, resnext*, wide_resnet*)",
    )
    _check(cfg.moco.dim > 0, "moco.dim", "must be positive")
    _check(cfg.moco.queue_size > 0, "moco.queue_size", "must be positive")
    _check(0.0 <= cfg.moco.momentum < 1.0, "moco.momentum", "must be in [0, 1)")
    _check(cfg.moco.temperature > 0, "moco.temperature", "must be positive")
    _check(
        not (cfg.moco.shuffle_bn and cfg.moco.sync_bn),
        "moco.sync_bn",
        "SyncBN and shuffle-BN are alternatives; set moco.shuffle_bn=false to use SyncBN",
    )
    _validate_loss(cfg.loss)
    validate_aug(cfg.aug)
    _validate_data(cfg.data)
    _validate_monitor(cfg.monitor, cfg.data)
    _validate_val(cfg.val, cfg.data, cfg.train)
    _check(cfg.optim.lr > 0, "optim.lr", "must be positive")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(cfg.train.max_steps is None or cfg.train.max_steps > 0, "train.max_steps", "must be positive")
    _check(cfg.train.epochs > 0, "train.epochs", "must be positive")
    _check(cfg.train.log_every > 0, "train.log_every", "must be positive")
    _check(cfg.train.ckpt_every >= 0, "train.ckpt_every", "must be >= 0 (0: only at the end)")
    _check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(
        cfg.cpu.threads is None or cfg.cpu.threads >= 1, "cpu.threads", "must be >= 1 (or null: automatic)"
    )
    _check(cfg.engine.collective_timeout_s >= 10, "engine.collective_timeout_s", "must be >= 10 seconds")
    _check(
        cfg.engine.deepspeed_config is None or Path(cfg.engine.deepspeed_config).is_file(),
        "engine.deepspeed_config",
        f"file not found: {cfg.engine.deepspeed_config}",
    )


def _validate_loss(loss: LossConfig) -> None:
    _check(loss.type in loss_types(), "loss.type", f"{loss.type!r} is not one of {loss_types()}")
    _check(len(loss.blocks) > 0 or loss.type == "none", "loss.blocks", "must name at least one block")
    _check(all(b in BLOCKS for b in loss.blocks), "loss.blocks", f"{loss.blocks}: blocks are 1..4")
    _check(len(set(loss.blocks)) == len(loss.blocks), "loss.blocks", f"{loss.blocks}: repeated block")
    _check(
        len(loss.weights) == len(loss.blocks),
        "loss.weights",
        f"has {len(loss.weights)} values for {len(loss.blocks)} blocks {loss.blocks}",
    )
    _check(all(w >= 0 for w in loss.weights), "loss.weights", "must be >= 0")
    for options in loss.options.values():
        if hasattr(options, "check"):
            options.check()


def validate_aug(aug: AugConfig) -> None:
    if aug.crop_scale is not None:
        _check(
            len(aug.crop_scale) == 2 and 0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1,
            "aug.crop_scale",
            f"{aug.crop_scale}: expected [min, max] with 0 < min <= max <= 1",
        )
    _check(
        len(aug.color_jitter) == 4 and all(v >= 0 for v in aug.color_jitter),
        "aug.color_jitter",
        "expected [brightness, contrast, saturation, hue] >= 0",
    )
    _check(aug.color_jitter[3] <= 0.5, "aug.color_jitter", "hue must be <= 0.5")
    for name in ("color_jitter_p", "grayscale_p", "blur_p"):
        _check(0 <= getattr(aug, name) <= 1, f"aug.{name}", "is a probability in [0, 1]")
    _check(
        len(aug.blur_sigma) == 2 and 0 < aug.blur_sigma[0] <= aug.blur_sigma[1],
        "aug.blur_sigma",
        "expected [min, max] with 0 < min <= max",
    )
    _check(0 <= aug.rotation <= 180, "aug.rotation", "degrees in [0, 180]")
    _check(
        len(aug.mean) == 3 and len(aug.std) == 3 and all(s > 0 for s in aug.std),
        "aug.std",
        "mean and std need 3 values, std > 0",
    )


def _validate_data(data: DataConfig) -> None:
    backends = [AUTO_BACKEND, *DATA_BACKENDS]
    _check(data.backend in backends, "data.backend", f"{data.backend!r} is not one of {backends}")
    _check(data.image_size >= 32, "data.image_size", "must be >= 32 (a ResNet downsamples 32x)")
    _check(data.batch_size >= 2, "data.batch_size", "must be >= 2 (BatchNorm needs a batch)")
    _check(data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check(0 <= data.dali.hw_decoder_load <= 1, "data.dali.hw_decoder_load", "is a fraction in [0, 1]")
    _check(data.dali.prefetch >= 1, "data.dali.prefetch", "must be >= 1")
    if data.backend == "synthetic":
        _check(data.synthetic.num_samples > 0, "data.synthetic.num_samples", "must be positive")
        _check(data.synthetic.num_classes > 1, "data.synthetic.num_classes", "must be > 1")
    else:
        _check(
            data.shards is not None,
            "data.shards",
            f"is required for data.backend={data.backend!r} (a directory written by data_tools.pack)",
        )


def _validate_monitor(mon: MonitorConfig, data: DataConfig) -> None:
    _check(mon.every >= 0, "monitor.every", "must be >= 0 (0: off)")
    for name in ("k", "max_bank", "max_val", "batch_size"):
        _check(getattr(mon, name) >= 1, f"monitor.{name}", "must be >= 1")
    _check(mon.temperature > 0, "monitor.temperature", "must be positive")
    _check(mon.num_workers >= 0, "monitor.num_workers", "must be >= 0")
    _check(
        mon.split_bank != mon.split_val,
        "monitor.split_val",
        f"must differ from monitor.split_bank ({mon.split_bank!r}): a query would find itself",
    )
    _check(
        mon.every == 0 or data.backend != "synthetic",
        "monitor.every",
        "the kNN monitor needs labelled packed shards; data.backend=synthetic has none (set monitor.every=0)",
    )


def _validate_val(val: ValConfig, data: DataConfig, train: TrainConfig) -> None:
    _check(val.every >= 0, "val.every", "must be >= 0 (0: off)")
    _check(val.max_samples is None or val.max_samples >= 1, "val.max_samples", "must be >= 1 (or null)")
    _check(val.num_workers >= 0, "val.num_workers", "must be >= 0")
    _check(
        train.export == "last" or val.every > 0,
        "train.export",
        "'best' selects by the validation loss: set val.every=N (optimizer steps between checks)",
    )
    if val.every:
        _check(
            data.backend != "synthetic",
            "val.every",
            "the validation loss needs packed shards with a val split; data.backend=synthetic has none",
        )
        _check(
            val.split != data.split,
            "val.split",
            f"must differ from data.split ({data.split!r}): the loss would be measured on training images",
        )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")

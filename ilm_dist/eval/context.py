"""What every evaluation command shares: config, data, initial weights, the evaluation protocol
(:mod:`ilm_dist.eval.protocol`) and the method's output directory.

Under the ``deepspeed`` launcher (``WORLD_SIZE`` > 1) :func:`open_context` joins the launcher's process
group as pretraining does; images are then run sharded over the ranks and gathered
(:meth:`EvalContext.features`, :meth:`EvalContext.predictions`), every rank reads what rank 0 decides
and saves (:func:`ilm_dist.distributed.on_main`), and only rank 0 writes files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ilm_dist.config import RunConfig, load_config
from ilm_dist.cpu_placement import place_this_process
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.distributed import dist_info, init_process_group, on_main
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import BlockFeatures, block_extractor, eval_loader, run_blocks, sharded_rows
from ilm_dist.eval.fit import metric_score, predict
from ilm_dist.eval.protocol import BUILTIN, BUILTIN_PROTOCOL, EvalProtocol, load_protocol
from ilm_dist.eval.store import (
    check_method_name,
    dataset_id,
    digest,
    load_npz,
    read_json,
    save_npz,
    write_json,
)
from ilm_dist.eval.weights import InitSpec, build_classifier, check_fits, load_state, resolve_init
from ilm_dist.folder_lock import FolderLock
from ilm_dist.model.encoder import build_resnet
from ilm_dist.options import check_bounds, option
from ilm_dist.paths import check_output_dir

log = logging.getLogger("ilm_dist")

SPLITS = ("train", "val", "test")
SOURCE = "source.json"
PROTOCOL = "protocol.json"  # the resolved evaluation protocol of a method directory
# keys of source.json that must agree when a method directory is reused, with the value a file written
# before the key existed means
SOURCE_IDENTITY = {"weights": None, "arch": None, "stem": "imagenet", "dataset_id": None, "image_size": None}


@dataclass
class EvalContext:
    cfg: RunConfig
    manifest: Manifest
    init: InitSpec
    state: dict[str, Tensor] | None
    eval_dir: Path
    name: str
    device: torch.device
    num_workers: int = 0
    batch_size: int = 128  # for inference, per rank
    protocol: EvalProtocol = BUILTIN_PROTOCOL

    @property
    def method_dir(self) -> Path:
        return self.eval_dir / self.name

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    def reader(self, split: str) -> ShardReader:
        return ShardReader(self.manifest, split)

    @cached_property
    def test_digest(self) -> str:
        reader = self.reader("test")
        return digest([reader.key(i) for i in range(len(reader))])

    def classifier(self) -> torch.nn.Module:
        """The ResNet with the initial weights and a fresh ``fc`` (one output per class), on the device.

        Seeded with the run's seed, so a random initialisation is the same network every time.
        """
        torch.manual_seed(self.cfg.seed)
        source = str(self.init.path or self.init.spec)
        model = self.cfg.model
        return build_classifier(model.arch, self.state, self.manifest.num_classes, source, model.stem).to(
            self.device
        )

    def _sharded(
        self, split: str, indices: Sequence[int] | None, run: Callable[[DataLoader], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``run`` over eval-mode views of ``split`` (or its ``indices``), sharded over ranks and gathered."""
        reader = self.reader(split)
        size = self.cfg.data.image_size

        def on_part(part: Sequence[int]) -> dict[str, np.ndarray]:
            return run(eval_loader(reader, self.cfg.aug, size, self.batch_size, self.num_workers, part))

        order = range(len(reader)) if indices is None else list(indices)
        return sharded_rows(on_part, order, self.batch_size)

    def features(
        self, resnet: torch.nn.Module, split: str, indices=None, with_logits: bool = False
    ) -> BlockFeatures:
        """Pooled block features (and logits) of ``split`` in eval mode, the same on every rank."""
        extractor = block_extractor(resnet, with_logits)
        arrays = self._sharded(
            split, indices, lambda loader: run_blocks(extractor, loader, self.device).arrays()
        )
        return BlockFeatures.from_arrays(arrays)

    def predictions(self, model: torch.nn.Module, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, labels)`` of ``model`` in eval mode over ``split``, the same on every rank."""

        def run(loader: DataLoader) -> dict[str, np.ndarray]:
            logits, labels = predict(model, loader, self.device)
            return {"logits": logits, "labels": labels}

        arrays = self._sharded(split, None, run)
        return arrays["logits"], arrays["labels"]

    def val_score(self, model: torch.nn.Module, metric: str) -> float:
        """Metric ``metric`` of ``model`` over the validation split, the same on every rank."""
        return metric_score(metric, self.task, *self.predictions(model, "val"), self.class_names)

    def classes_without_samples(self) -> dict[str, list[str]]:
        """Per evaluation split (val, test), the classes with no sample there (multi-label: no positive):
        their metrics there are undefined, and validation-based model selection cannot see them."""
        return {
            split: [name for name, count in self.manifest.split(split).class_counts.items() if count == 0]
            for split in ("val", "test")
        }

    def source_record(self, config_path: Path) -> dict:
        return {
            "name": self.name,
            "weights": self.init.describe(),
            "arch": self.cfg.model.arch,
            "stem": self.cfg.model.stem,
            "config": str(config_path),
            "data": str(self.manifest.root),
            "dataset_id": dataset_id(self.manifest),
            "task": self.task,
            "class_names": list(self.class_names),
            "image_size": self.cfg.data.image_size,
            "test_digest": self.test_digest,
        }


@dataclass
class EvalTarget:
    """What an evaluation command evaluates, on which data, and where its results go."""

    weights: str = field(
        default="",
        metadata=option(
            "'random', a pretraining run dir, backbone.pt / torchvision state_dict, or a DeepSpeed "
            "checkpoint (run/checkpoints[/step_N])",
            required=True,
        ),
    )
    out: str = field(
        default="",
        metadata=option("evaluation directory shared by the methods on one dataset", required=True),
    )
    config: str | None = field(
        default=None, metadata=option("run config (default: the config.yaml of the run that wrote --weights)")
    )
    name: str | None = field(
        default=None,
        metadata=option(
            "method name, the folder EVAL_DIR/<name>: letters, digits, '_', '.', '-' (default: the run's "
            "name; 'random_init' for random)"
        ),
    )
    workers: int = field(default=0, metadata=option("DataLoader workers (per rank)", min=0))
    eval_batch_size: int = field(
        default=128, metadata=option("inference batch per rank (features, validation, test)", min=1)
    )
    protocol: str = field(
        default=BUILTIN,
        metadata=option(
            "evaluation protocol: ilm_dist (the defaults), a name in configs/protocols (official) or a "
            "YAML file; a flag given on the command line overrides its value"
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=option(
            "the protocol's dataset section (default: the one whose task is the packed dataset's)"
        ),
    )
    overrides: list[str] = field(default_factory=list)  # key=value overrides of the run config

    def __post_init__(self) -> None:
        check_bounds(self)


def open_context(target: EvalTarget, device: torch.device | None = None) -> EvalContext:
    """Resolve weights and config, load the data manifest, check the weights fit, claim ``EVAL_DIR/<name>``.

    ``device=None``: this process's device from :func:`join_launcher` (which joins the launcher's
    process group when there is one).
    """
    weights, config, overrides = target.weights, target.config, target.overrides
    check_output_dir(target.out, "--out")
    protocol_file = load_protocol(target.protocol)
    init = resolve_init(weights)
    config_path = Path(config) if config else init.run_config
    if config_path is None:
        raise EvalError(
            f"--weights {weights}: no run config.yaml beside it; pass --config (a run config naming "
            "model.arch, data.shards, data.image_size and aug), e.g. --config configs/idc/moco.yaml"
        )
    cfg = load_config(config_path, overrides)
    name = target.name or default_name(init, cfg)
    check_method_name(name, "--name")
    if device is None:
        device = join_launcher(cfg, target.workers)
    if cfg.data.shards is None:
        raise EvalError(f"{config_path}: data.shards is not set (evaluation needs a packed dataset)")
    manifest = load_manifest(cfg.data.shards)
    for split in SPLITS:
        manifest.split(split)
    protocol = protocol_file.resolve(manifest.task, target.dataset)
    apply_inputs(cfg, protocol, init)
    state = load_state(init)
    if state is not None:
        check_fits(build_resnet(cfg.model.arch, stem=cfg.model.stem), state, cfg.model.arch, str(init.path))
    ctx = EvalContext(
        cfg,
        manifest,
        init,
        state,
        Path(target.out),
        name,
        device,
        target.workers,
        target.eval_batch_size,
        protocol,
    )
    on_main(lambda: claim_method_dir(ctx, config_path))
    for split, names in ctx.classes_without_samples().items():
        if names and dist_info().is_main:
            log.warning(
                "%s: class(es) %s have no samples in the %s split: their %s metrics are undefined (NaN)%s",
                manifest.root,
                ", ".join(repr(n) for n in names),
                split,
                split,
                " and model selection ignores them" if split == "val" else "",
            )
    return ctx


def apply_inputs(cfg: RunConfig, protocol: EvalProtocol, init: InitSpec) -> None:
    """``inputs: to_tensor``: images in [0, 1], not normalised (the official code's ``ToTensor``)."""
    if protocol.inputs != "to_tensor":
        return
    unit = ([0.0] * 3, [1.0] * 3)
    if (cfg.aug.mean, cfg.aug.std) != unit and init.kind != "random" and dist_info().is_main:
        log.warning(
            "protocol %s feeds ToTensor inputs (mean 0, std 1), but the run config normalises with mean %s "
            "and std %s: the weights were pretrained on other inputs than they are evaluated on",
            protocol.name,
            cfg.aug.mean,
            cfg.aug.std,
        )
    cfg.aug.mean, cfg.aug.std = unit


def join_launcher(cfg: RunConfig, workers: int) -> torch.device:
    """This process's device, its CPU placement applied first (``workers`` loader workers per rank, see
    :mod:`ilm_dist.cpu_placement`). Under the ``deepspeed`` launcher (``WORLD_SIZE`` > 1) it joins the
    process group as pretraining does (:func:`ilm_dist.distributed.init_process_group`: NCCL on GPUs, gloo
    on CPUs, ``engine.collective_timeout_s``) and takes its local GPU; in one process (plain ``python``)
    there is no process group: CUDA when available, else the CPU."""
    place_this_process(workers, cfg.cpu, gpu=torch.cuda.is_available())
    if dist_info().world_size > 1:
        return init_process_group(cfg.engine.dist_backend, cfg.engine.collective_timeout_s)[1]
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_name(init: InitSpec, cfg: RunConfig) -> str:
    if init.kind == "random":
        return "random_init"
    return cfg.name if init.run_config is not None else init.path.stem


def claim_method_dir(ctx: EvalContext, config_path: Path) -> None:
    """Write ``source.json`` and ``protocol.json``, or check that the existing ones describe the same
    weights, data and evaluation protocol (and leave them as they are when nothing in them changed)."""
    record = ctx.source_record(config_path)
    path = ctx.method_dir / SOURCE
    if path.is_file():
        old = read_json(path)
        diff = [k for k, before in SOURCE_IDENTITY.items() if old.get(k, before) != record[k]]
        if diff:
            raise EvalError(
                f"{path} describes another evaluation ({', '.join(f'{k}: {old.get(k, SOURCE_IDENTITY[k])} vs {record[k]}' for k in diff)}); "
                "pass another --name or remove that directory"
            )
    protocol, protocol_path = ctx.protocol.record(), ctx.method_dir / PROTOCOL
    if protocol_path.is_file() and (old := read_json(protocol_path))["digest"] != protocol["digest"]:
        raise EvalError(
            f"{protocol_path}: {ctx.method_dir} was evaluated under protocol {old['name']} (dataset "
            f"{old['dataset']}, digest {old['digest']}), not {protocol['name']} (dataset {protocol['dataset']}, "
            f"digest {protocol['digest']}); pass another --name or --out"
        )
    for file, content in ((path, record), (protocol_path, protocol)):
        if not file.is_file() or read_json(file) != content:
            write_json(file, content)


@contextmanager
def result_lock(out: Path, what: str) -> Iterator[None]:
    """Rank 0 holds the lock of the result folder ``out`` (:class:`FolderLock`) while one result is decided and
    computed there, so a second command on the same result stops at once naming the first; raised on every rank."""
    held: list[FolderLock] = []
    on_main(lambda: held.append(FolderLock(out, what)))
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def saved_or_computed(
    path: Path, force: bool, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays saved at ``path`` (read by rank 0, shared with every rank), or ``compute()`` on every
    rank (it may run collectives) saved by rank 0. Rank 0 decides, so all ranks take the same branch."""
    saved = on_main(lambda: load_npz(path) if path.is_file() and not force else None)
    if saved is not None:
        return saved
    arrays = compute()
    on_main(lambda: save_npz(path, **arrays))
    return arrays


def init_test_features(ctx: EvalContext, force: bool = False) -> dict[str, np.ndarray]:
    """Block features of the test split before fine-tuning (cached in ``init_features_test.npz``)."""
    return saved_or_computed(
        ctx.method_dir / "init_features_test.npz",
        force,
        lambda: ctx.features(ctx.classifier(), "test").arrays(),
    )

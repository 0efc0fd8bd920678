"""The pretraining loop: MoCo v2 + intermediate-layer losses under a DeepSpeed engine.

One step (He et al. 2020, Algorithm 1, with the ILM losses of Kaku et al. 2021):

1. momentum-update the key encoder from the query encoder (once per optimizer step);
2. keys of view 2 through the key encoder, shuffled across ranks (shuffle-BN);
3. query of view 1 through the engine: InfoNCE against [key, queue] + intermediate losses;
4. backward and optimizer step through the engine;
5. all-gather the keys and enqueue the same global batch on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ilm_dist import distributed as D
from ilm_dist.config import RunConfig, read_yaml_mapping, save_config
from ilm_dist.cpu_placement import current_placement, place_this_process
from ilm_dist.data import Placement, TwoViewBatch, build_pretrain_loader
from ilm_dist.data.manifest import Manifest, load_manifest
from ilm_dist.data.sampling import GlobalBatch
from ilm_dist.errors import InputError
from ilm_dist.folder_lock import FolderLock
from ilm_dist.moco.key_encoder import KeyEncoder
from ilm_dist.moco.queue import KeyQueue
from ilm_dist.moco.shuffle_bn import shuffled_forward
from ilm_dist.model.moco import MoCoILM
from ilm_dist.serialization import save_tensors
from ilm_dist.train import checkpoint, faults
from ilm_dist.train import engine as ds_engine
from ilm_dist.train.health import Heartbeat, NanWatch
from ilm_dist.train.metrics_log import MetricsLogger
from ilm_dist.train.optim import build_optimizer, build_scheduler, scaled_lr
from ilm_dist.train.resume_check import (
    data_change,
    data_identity,
    record_changes,
    refuse_changes,
    settings_changes,
)
from ilm_dist.train.run_dir import RunDir
from ilm_dist.train.run_plan import training_plan
from ilm_dist.train.selection import BestBackbone, write_atomic_tensors
from ilm_dist.train.timing import StepTimer
from ilm_dist.train.validation import Models, ValidatorBuilder, selection_criterion

log = logging.getLogger("ilm_dist")
# The values of CUBLAS_WORKSPACE_CONFIG with which cuBLAS is deterministic (torch docs, "Reproducibility").
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def use_deterministic_algorithms(gpu: bool) -> None:
    """``train.deterministic``: torch's deterministic algorithms and, on a GPU, cuBLAS's deterministic workspace.

    Called before the first matmul: torch reads CUBLAS_WORKSPACE_CONFIG for the workspace size once, at the
    first cuBLAS call (aten/src/ATen/cuda/CublasHandlePool.cpp), and in deterministic mode a cuBLAS matmul
    without one of CUBLAS_DETERMINISTIC raises RuntimeError (aten/src/ATen/Context.cpp,
    checkCuBLASConfigDeterministic). A value set by the user is kept if it is one of them.
    """
    if gpu:
        value = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
        if value not in CUBLAS_DETERMINISTIC:
            raise InputError(
                f"train.deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG={' or '.join(CUBLAS_DETERMINISTIC)} "
                f"(or unset), got {value!r}"
            )
    torch.use_deterministic_algorithms(True)


class Trainer:
    """One pretraining run. ``resume``: continue from ``output_dir``'s latest checkpoint; ``overwrite``: start
    over in an ``output_dir`` that holds an earlier run, deleting its files (otherwise that is refused).
    ``validators``: builders of the components run every few steps (:mod:`ilm_dist.train.validation`);
    ``timer``: per-phase step timing for a benchmark (default: a disabled StepTimer, which is free);
    ``manifest``: the packed set's, when the command loaded it already (:func:`preflight`)."""

    def __init__(
        self,
        cfg: RunConfig,
        resume: bool = False,
        overwrite: bool = False,
        validators: Sequence[ValidatorBuilder] = (),
        timer: StepTimer | None = None,
        allow_changes: bool = False,
        manifest: Manifest | None = None,
    ):
        self.cfg = cfg
        self.allow_changes = allow_changes
        self.resume_changes: list[str] = []
        gpu = D.select_accelerator() == "cuda"
        if cfg.train.deterministic:
            use_deterministic_algorithms(gpu)
        # before any thread exists: the rank's cores and intra-op threads (ilm_dist.cpu_placement)
        self.cpu = place_this_process(cfg.data.num_workers, cfg.cpu, gpu=gpu, announce=False)
        self.info, self.device = D.init_process_group(
            cfg.engine.dist_backend, cfg.engine.collective_timeout_s
        )
        self.run = RunDir(cfg.output_dir)
        self.folder_lock: FolderLock | None = None  # rank 0's, for the life of the run
        try:
            D.on_main(lambda: self._own_output_dir(resume, overwrite))
            self._set_up(resume, validators, timer, manifest)
        except BaseException:
            self.release_output_dir()
            raise

    def _own_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Rank 0: lock ``output_dir`` against a second run, then (without ``resume``) check or empty it before
        anything is written: an earlier run is never overwritten silently."""
        self.folder_lock = FolderLock(self.run.root, "pretraining run")
        if not resume:
            self.run.prepare_fresh(overwrite)

    def release_output_dir(self) -> None:
        if self.folder_lock is not None:
            self.folder_lock.release()

    def _set_up(
        self,
        resume: bool,
        validators: Sequence[ValidatorBuilder],
        timer: StepTimer | None,
        manifest: Manifest | None,
    ) -> None:
        cfg = self.cfg
        # loaded once (by the command's preflight, else here), handed to the loader, the resume check and
        # the validators
        if manifest is None and cfg.data.backend != "synthetic":
            manifest = load_manifest(cfg.data.shards)
        self.manifest = manifest
        self.data_identity = data_identity(cfg.data, self.manifest)
        torch.manual_seed(cfg.seed)
        where = Placement(
            self.info.rank, self.info.world_size, self.device, cfg.seed, cfg.model.channels_last
        )
        self.loader = build_pretrain_loader(cfg.data, cfg.aug, where, self.manifest)
        ds_config = ds_engine.resolve_deepspeed_config(cfg.engine.deepspeed_config, cfg.data.batch_size)
        ds_config, precision_note = ds_engine.with_cpu_autocast(
            ds_config, cfg.engine.cpu_autocast, self.device
        )
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.batch = GlobalBatch(cfg.data.batch_size, self.info.world_size, self.grad_accum)
        self.total_steps = self._total_steps()
        if self.info.is_main:
            per_epoch = self.loader.steps_per_epoch // self.grad_accum
            plan = training_plan(cfg.train, cfg.optim, cfg.val, self.run, self.batch, per_epoch)
            log.info(
                "%s; cpu: %s%s", plan, self.cpu.describe(), f"; {precision_note}" if precision_note else ""
            )
        self.dtype = ds_engine.DTYPES[ds_engine.precision_of(ds_config)]
        model = self._build_model()
        self.key_encoder = KeyEncoder(model.encoder).to(self.device, memory_format=self._memory_format())
        optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, self.batch.samples))
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        self.engine = ds_engine.wrap(model, optimizer, scheduler, ds_config, cfg.model.channels_last)
        self.queue = KeyQueue(cfg.moco.queue_size, cfg.moco.dim, self.device, cfg.seed)
        self.epoch, self.step_in_epoch, self.micro_steps = 0, 0, 0
        self.selection = (
            BestBackbone(self.run, selection_criterion(cfg.val), self.info.is_main) if cfg.val.every else None
        )
        if resume:
            self._restore()  # reads only: a failed resume leaves the run as it was
        D.on_main(self._claim_output_dir)
        self.metrics = MetricsLogger(self.run, self.info.is_main, first_step=self.global_step + 1)
        self.nan_watch = NanWatch(self.engine.module.term_names())
        self.heartbeat = Heartbeat(self.run, self.info.rank, self.info.world_size)
        self.validators = [
            v
            for v in (build(where, self.manifest) for build in validators)
            if self.info.is_main or not v.main_rank_only
        ]
        self.timer = timer or StepTimer()
        if self.info.world_size == 1 and cfg.moco.shuffle_bn:
            log.warning(
                "one rank: shuffle-BN has no other rank to shuffle with (see ilm_dist/moco/shuffle_bn.py)"
            )

    def _claim_output_dir(self) -> None:
        """Rank 0, once the run is sure to start: the resolved config, metrics up to the resumed step, and
        the best backbone's files as of that step."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        record_changes(self.run, self.resume_changes, self.global_step)
        save_config(self.cfg, self.run.config)
        dropped = self.run.keep_metrics_until(self.global_step)
        if dropped:
            log.info("dropped %d metric records logged after step %d", dropped, self.global_step)
        if self.selection is not None:
            self.selection.sync_files()

    # ------------------------------------------------------------------ setup

    def _total_steps(self) -> int:
        per_epoch = self.loader.steps_per_epoch // self.grad_accum
        if per_epoch == 0:
            data = self.cfg.data
            raise InputError(
                f"data.batch_size: split {data.split!r} of {data.shards} is too small for one optimizer step of "
                f"{data.batch_size} per rank x {self.info.world_size} ranks x {self.grad_accum} accumulation "
                f"steps ({self.loader.description}); use a smaller data.batch_size or fewer ranks"
            )
        return self.cfg.train.max_steps or per_epoch * self.cfg.train.epochs

    def _build_model(self) -> MoCoILM:
        model = MoCoILM(self.cfg.model, self.cfg.moco, self.cfg.loss)
        if self.cfg.moco.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Contiguous until DeepSpeed has started (ds_engine.wrap turns the weights channels-last after its
        # start-up broadcast, under ZeRO stage 0); channels-last inputs (train_step), loader layout (data
        # backends) and key encoder (__init__) follow model.channels_last from the start.
        return model.to(self.device)

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format

    def _validate(self, step: int) -> None:
        models = Models(self.engine.module, self.key_encoder, self.queue.keys)
        for validator in self.validators:
            if step % validator.every and not (validator.at_end and step == self.total_steps):
                continue
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                results = validator(models, step)
            self.metrics.log({"step": step, "epoch": self.epoch, **results})
            if self.selection is not None and self.selection.metric in results:
                self._select(step, results[self.selection.metric])
            log.info(
                "step %d %s: %s",
                step,
                type(validator).__name__,
                " ".join(f"{k}={v:.3f}" for k, v in results.items()),
            )

    def _select(self, step: int, value: float) -> None:
        encoder = self.engine.module.encoder
        backbone = encoder.backbone_state_dict() if self.info.is_main else None
        if self.selection.update(step, self.epoch, value, backbone):
            log.info("step %d: new best %s %.4f", step, self.selection.metric, value)

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    # ------------------------------------------------------------------ state

    def client_state(self) -> dict:
        """What DeepSpeed does not know about, saved with its checkpoint: MoCo state and data position."""
        return {
            "moco": {
                "key_encoder": self.key_encoder.state_dict(),
                "queue": self.queue.state_dict(),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "micro_steps": self.micro_steps,
                "global_step": self.global_step,
                "world_size": self.info.world_size,
                "batch_size": self.cfg.data.batch_size,
                "data": self.data_identity,
            },
            "selection": self.selection.state_dict() if self.selection is not None else None,
        }

    def _restore(self) -> None:
        # the run-defining settings (model.arch included) live in config.yaml alone, not in the checkpoint:
        # compared before DeepSpeed tries to load another model's tensors
        saved = self.run.config
        if saved.is_file():
            changes = settings_changes(read_yaml_mapping(saved, "the run's saved config"), self.cfg)
            refuse_changes(self.run, changes, self.allow_changes)
            self.resume_changes += changes
        client_state = checkpoint.restore(self.engine, self.run, self.info.world_size)
        state = client_state["moco"]
        changes = data_change(state.get("data"), self.data_identity)
        refuse_changes(self.run, changes, self.allow_changes)
        self.resume_changes += changes
        if self.selection is not None:
            self.selection.load_state_dict(client_state.get("selection"))
        self.key_encoder.load_state_dict(state["key_encoder"])
        self.queue.load_state_dict(state["queue"])
        self.epoch, self.micro_steps = state["epoch"], state["micro_steps"]
        self.step_in_epoch = state["step_in_epoch"]
        if (state["world_size"], state["batch_size"]) != (self.info.world_size, self.cfg.data.batch_size):
            self._reshard(state)
        log.info(
            "resumed at step %d (epoch %d, batch %d of the epoch)",
            self.global_step,
            self.epoch,
            self.step_in_epoch,
        )

    def _reshard(self, state: dict) -> None:
        """Continue on another world size or batch: same epoch permutation, position kept in samples."""
        done = state["step_in_epoch"] * GlobalBatch(state["batch_size"], state["world_size"]).per_micro_step
        global_batch = self.batch.per_micro_step
        self.step_in_epoch = done // global_batch
        log.warning(
            "resuming on %d ranks x batch %d (checkpoint: %d x %d): data re-sharded, %d samples of epoch %d "
            "done -> batch %d (%d samples seen again); queue, key encoder, optimizer state and LR schedule "
            "(base LR %.4g, for the checkpoint's global batch) kept",
            self.info.world_size,
            self.cfg.data.batch_size,
            state["world_size"],
            state["batch_size"],
            done,
            self.epoch,
            self.step_in_epoch,
            done - self.step_in_epoch * global_batch,
            self.engine.lr_scheduler.base_lrs[0],
        )

    def save_checkpoint(self) -> Path:
        self.nan_watch.check()  # never checkpoint a run whose loss went non-finite
        return checkpoint.save(
            self.engine, self.run, self.global_step, self.client_state(), self.cfg.train.keep_checkpoints
        )

    def export_backbone(self) -> Path:
        """``backbone.pt``: the last step's backbone, or with ``train.export=best`` the best one (the last
        then goes to ``backbone_last.pt``)."""
        path = self.run.backbone
        best = self.selection.best_backbone() if self.cfg.train.export == "best" else None
        if self.info.is_main:
            last = self.engine.module.encoder.backbone_state_dict()
            if best is not None:
                write_atomic_tensors(best, path)
                save_tensors(last, self.run.last_backbone)
            else:
                save_tensors(last, path)
        D.barrier()
        return path

    # ------------------------------------------------------------------ loop

    def _key_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.engine.module.key_features(self.key_encoder, images)

    def train_step(self, batch: TwoViewBatch) -> dict[str, torch.Tensor]:
        cfg, phase = self.cfg, self.timer.phase
        with phase("to_device"):
            batch = batch.to(self.device, self.dtype, cfg.model.channels_last)
        with phase("ema"):
            if self.micro_steps % self.grad_accum == 0:
                self.key_encoder.update(self.engine.module.encoder, cfg.moco.momentum)
        with phase("key_forward"):
            if cfg.moco.shuffle_bn:
                keys = shuffled_forward(self._key_features, batch.view2, cfg.seed, self.micro_steps)
            else:
                keys = self._key_features(batch.view2)
        with phase("forward"):
            terms = self.engine(batch.view1, keys, self.queue.keys)
        if faults.injected("nan", self.global_step + 1):
            terms = {name: term * float("nan") for name, term in terms.items()}
        with phase("backward"):
            self.engine.backward(terms["loss"])
        with phase("optimizer"):
            ds_engine.step(self.engine)
        with phase("queue"):
            self.queue.enqueue(D.all_gather_no_grad(keys[0]))
        self.micro_steps += 1
        self.nan_watch.record(self.global_step, terms)
        return terms

    def fit(self) -> None:
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc="pretrain",
            dynamic_ncols=True,
            disable=not self.info.is_main,
        )
        try:
            with bar:  # closed on the way out, so an error message starts on its own line
                self._train(bar)
            self.save_checkpoint()
            self.export_backbone()
            self._write_final_state()
            self.metrics.close()
        finally:
            self.release_output_dir()

    def _train(self, bar: tqdm) -> None:
        cfg = self.cfg
        samples_per_step = self.batch.per_micro_step
        tick, ticks = time.perf_counter(), 0
        while self.global_step < self.total_steps:
            for batch in self.loader.epoch(self.epoch, self.step_in_epoch):
                terms = self.train_step(batch)
                self.step_in_epoch += 1
                ticks += 1
                if self.micro_steps % self.grad_accum:
                    continue  # inside a gradient-accumulation cycle
                bar.update(1)
                step = self.global_step
                self.heartbeat.beat(step)
                faults.maybe_kill("step", step)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    rate = ticks * samples_per_step / (time.perf_counter() - tick)
                    self._log(step, terms, rate, bar)
                    tick, ticks = time.perf_counter(), 0
                self._validate(step)
                if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    self.save_checkpoint()
                if step >= self.total_steps:
                    break
            else:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _write_final_state(self) -> None:
        """Check that every rank ended with the same queue, and record it in ``final_state.json``."""
        # with the queue, what each rank ran with, read back from torch and the OS
        gathered = D.all_gather_object((self.queue.checksum(), current_placement()))
        checksums, placements = [c for c, _ in gathered], [p for _, p in gathered]
        if len(set(checksums)) != 1:
            raise RuntimeError(f"the key queues differ between ranks at step {self.global_step}: {checksums}")
        if self.info.is_main:
            state = {
                "step": self.global_step,
                "epoch": self.epoch,
                "queue_ptr": self.queue.ptr,
                "queue_sha256_per_rank": checksums,
                "world_size": self.info.world_size,
                "cpu_placement": self.cpu.describe(),
                "cpu_per_rank": placements,
                "best": self.selection.record() if self.selection is not None else None,
                "export": self.cfg.train.export,
            }
            self.run.final_state.write_text(json.dumps(state, indent=2))

    def _log(self, step: int, terms: dict[str, torch.Tensor], rate: float, bar) -> None:
        self.nan_watch.check()
        names = list(terms)
        values = D.all_reduce_mean_(torch.stack([terms[n].detach().float() for n in names]))
        record = {"step": step, "epoch": self.epoch, "lr": self.engine.get_lr()[0]}
        record |= {name: float(v) for name, v in zip(names, values.tolist(), strict=True)}
        record["samples_per_s"] = rate
        self.metrics.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", moco=f"{record['moco']:.4f}", ips=f"{rate:.0f}")

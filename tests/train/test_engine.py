"""train/engine.py in one process: channels-last weights after DeepSpeed's start-up (ZeRO stage 0), and a
second engine after the first one's process group was shut down."""

import torch

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.train.trainer import Trainer
from tests.launcher import REPO

TINY = [
    "data.backend=synthetic",
    "data.image_size=32",
    "data.batch_size=8",
    "data.synthetic.num_samples=64",
    "moco.queue_size=32",
    "moco.shuffle_bn=false",
    "engine.cpu_autocast=none",
    "optim.schedule=constant",
]


def trainer(tmp_path, channels_last: bool) -> Trainer:
    name = f"cl{int(channels_last)}"
    overrides = [*TINY, f"model.channels_last={str(channels_last).lower()}", f"output_dir={tmp_path / name}"]
    return Trainer(load_config(REPO / "configs/demo.yaml", overrides))


def conv_weights(t: Trainer) -> list[torch.Tensor]:
    return [m.weight for m in t.engine.module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_weights_train_as_contiguous_ones_and_export_contiguous(tmp_path):
    nhwc, nchw = trainer(tmp_path, True), trainer(tmp_path, False)
    for w in conv_weights(nhwc):  # a 1 x 1 kernel is both layouts at once
        assert w.is_contiguous(memory_format=torch.channels_last)
        assert w.shape[-1] == 1 or not w.is_contiguous()
    assert all(w.is_contiguous() for w in conv_weights(nchw))
    batch = next(iter(nchw.loader.epoch(0)))
    for _ in range(2):
        a, b = nhwc.train_step(batch), nchw.train_step(batch)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
    for p, q in zip(nhwc.engine.module.parameters(), nchw.engine.module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    exported = nhwc.engine.module.encoder.backbone_state_dict()
    assert all(v.is_contiguous() for v in exported.values())


def test_a_second_run_after_shutdown_starts_in_the_same_process(tmp_path):
    """distributed.shutdown goes through DeepSpeed, which drops its cached groups: destroyed by torch alone,
    the next deepspeed.initialize in the process failed ("Group ... is not registered")."""
    first = trainer(tmp_path / "a", False)
    first.train_step(next(iter(first.loader.epoch(0))))
    D.shutdown()
    second = trainer(tmp_path / "b", False)
    terms = second.train_step(next(iter(second.loader.epoch(0))))
    assert torch.isfinite(terms["loss"])
    D.shutdown()

"""The encoder's two stems (model.stem): block shapes at 32 and 64 px, block taps against a hand-written
forward, the dry run's shapes, and a small-stem backbone exported as pretraining exports it, loaded by the
probe and fine-tuning commands from its run folder alone; weights of the other stem are refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ilm_dist.config import load_config, save_config
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.eval.commands import finetune_main, probe_main
from ilm_dist.eval.errors import EvalError
from ilm_dist.eval.features import eval_loader
from ilm_dist.eval.store import load_npz, read_json
from ilm_dist.eval.weights import build_classifier, fingerprint
from ilm_dist.model.encoder import Encoder
from ilm_dist.model.moco import MoCoILM
from ilm_dist.plan import build_plan
from ilm_dist.serialization import save_tensors
from tests.eval.support import pack_dataset
from tests.launcher import REPO

# input pixels per block-map pixel after blocks 1..4: the ImageNet stem downsamples 4x (conv stride 2,
# max-pool stride 2) before layer1, the small stem not at all; layers 2-4 halve the map each
DOWNSAMPLING = {"imagenet": (4, 8, 16, 32), "small": (1, 2, 4, 8)}
CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet50": (256, 512, 1024, 2048)}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem", ["imagenet", "small"])
@pytest.mark.parametrize("size", [32, 64])
def test_every_block_has_the_shape_of_its_stem(arch, stem, size):
    with torch.device("meta"):  # shapes only
        encoder = Encoder(arch, 16, mlp=True, stem=stem)
        out = encoder(torch.empty(2, 3, size, size))
    expected = [(2, c, size // d, size // d) for c, d in zip(CHANNELS[arch], DOWNSAMPLING[stem], strict=True)]
    assert [tuple(b.shape) for b in out.blocks] == expected
    assert encoder.channels == list(CHANNELS[arch]) and tuple(out.embedding.shape) == (2, 16)


def test_the_small_stem_is_a_3x3_stride_1_conv_without_pooling_initialised_as_torchvision_does():
    torch.manual_seed(0)
    resnet = Encoder("resnet18", 16, mlp=False, stem="small").backbone
    conv = resnet.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(resnet.maxpool, nn.Identity)
    # kaiming normal, fan_out, ReLU gain: std sqrt(2 / (64 * 3 * 3)), as torchvision initialises its convs
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    assert abs(conv.weight.mean().item()) < 0.01


def reference_resnet(stem: str, state: dict) -> nn.Module:
    """torchvision's resnet18 with the stem written out here (SimCLR's CIFAR stem, Chen et al. 2020,
    Appendix B.9: a 3x3 stride-1 conv1 and no max-pooling), holding ``state``."""
    resnet = torchvision.models.resnet18()
    if stem == "small":
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert (sorted(missing), unexpected) == (["fc.bias", "fc.weight"], [])  # torchvision's names
    return resnet.eval()


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_block_taps_are_the_outputs_of_a_hand_written_forward(stem):
    torch.manual_seed(1)
    encoder = Encoder("resnet18", 16, mlp=True, zero_init_residual=False, stem=stem).eval()
    ref = reference_resnet(stem, encoder.backbone_state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = encoder(images)
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(images))))
        for tap, layer in zip(out.blocks, (ref.layer1, ref.layer2, ref.layer3, ref.layer4), strict=True):
            x = layer(x)
            torch.testing.assert_close(tap, x)
        torch.testing.assert_close(out.embedding, encoder.head(torch.flatten(ref.avgpool(x), 1)))


@pytest.mark.parametrize(
    ("stem", "maps"), [("imagenet", "64x8x8, 128x4x4"), ("small", "64x32x32, 128x16x16")]
)
def test_the_dry_run_builds_the_configured_stem(stem, maps):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.image_size=32", f"model.stem={stem}"])
    text = build_plan(cfg, 1, 1, None, None).render()
    assert f"encoder           resnet18, {stem} stem; blocks 1-4 at 32 px: {maps}, " in text


# --------------------------------------------------------------------------- export -> evaluation


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_dataset(tmp_path_factory.mktemp("data"), {"train": 32, "val": 8, "test": 16}, num_classes=2)


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory) -> tuple[Path, Encoder]:
    """A run folder as pretraining leaves it (config.yaml, backbone.pt) for the small stem, and its encoder."""
    run = tmp_path_factory.mktemp("run") / "small"
    run.mkdir()
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["model.stem=small", f"data.shards={data}", "data.image_size=32", f"output_dir={run}", "name=small"],
    )
    torch.manual_seed(2)
    encoder = MoCoILM(cfg.model, cfg.moco, cfg.loss).encoder.eval()
    with torch.no_grad():  # BN statistics away from their defaults, so that loading them is checked too
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    save_config(cfg, run / "config.yaml")
    save_tensors(encoder.backbone_state_dict(), run / "backbone.pt")
    return run, encoder


def test_the_probe_loads_the_small_stem_backbone_from_its_run_folder(exported, tmp_path):
    run, encoder = exported
    probe_main(
        ["--weights", str(run), "--out", str(tmp_path), "--epochs", "1", "--evals", "1", "--bootstrap", "5"]
    )
    (metrics,) = (tmp_path / "small" / "probe").glob("*/metrics.json")
    reference = reference_resnet("small", encoder.backbone_state_dict())
    assert read_json(metrics)["backbone_sha256"] == fingerprint(reference)
    assert read_json(tmp_path / "small" / "source.json")["stem"] == "small"


def test_fine_tuning_starts_from_the_small_stem_backbone_of_its_run_folder(exported, data, tmp_path):
    run, encoder = exported
    quick = ["--epochs", "1", "--batch-size", "32", "--evals", "1", "--bootstrap", "5"]
    finetune_main(
        ["--weights", str(run), "--out", str(tmp_path), "--fractions", "1", "--mode", "linear", *quick]
    )
    frozen = load_npz(tmp_path / "small" / "finetune" / "linear_f1" / "features_test.npz")  # linear: frozen
    cfg = load_config(run / "config.yaml")
    loader = eval_loader(ShardReader(load_manifest(data), "test"), cfg.aug, 32)
    with torch.no_grad():
        taps = [encoder(images).blocks for images, _ in loader]
    for i in range(4):
        pooled = torch.cat([blocks[i] for blocks in taps]).mean(dim=(2, 3)).numpy()
        np.testing.assert_allclose(frozen[f"block{i + 1}"], pooled, rtol=1e-4, atol=1e-5)


def test_weights_of_the_other_stem_are_refused_in_one_line(exported, tmp_path, capsys):
    run, _ = exported
    with pytest.raises(SystemExit) as exit_info:
        probe_main(["--weights", str(run), "--out", str(tmp_path), "model.stem=imagenet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {run / 'backbone.pt'}: weights of model.stem=small (3x3 conv1), the run config has "
        "model.stem=imagenet; evaluate them with the config of the run that wrote them, or pass model.stem=small\n"
    )
    imagenet = Encoder("resnet18", 16, mlp=False).backbone_state_dict()
    with pytest.raises(
        EvalError, match=r"^x: weights of model.stem=imagenet \(7x7 conv1\), the run config has "
    ):
        build_classifier("resnet18", imagenet, 2, "x", stem="small")

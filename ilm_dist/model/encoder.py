"""ResNet encoder with taps on the block outputs, and the MoCo projection head.

The backbone is a torchvision ResNet; ``create_feature_extractor`` exposes ``layer1..layer4`` and the
pooled features without forking its forward. Its stem (``model.stem``) is torchvision's ``imagenet`` one
(7x7 stride-2 conv, then 3x3 stride-2 max-pooling: block maps at 1/4..1/32 of the input) or the ``small``
one of CIFAR-scale SSL recipes (3x3 stride-1 conv, no max-pooling: block maps at 1/1..1/8; SimCLR,
Chen et al. 2020, Appendix B.9). Parameter names stay torchvision's, so the exported backbone loads into
``torchvision.models.<arch>()`` (the small stem's once its ``conv1`` and ``maxpool`` are swapped the same
way, :func:`build_resnet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from ilm_dist.config import Stem

BLOCK_NODES = ("layer1", "layer2", "layer3", "layer4")
# conv1's kernel size per stem: how a weights file shows which stem it was trained with
STEM_KERNELS: dict[str, int] = {"imagenet": 7, "small": 3}


@dataclass
class EncoderOutput:
    embedding: Tensor  # [B, dim], not normalised
    blocks: list[Tensor]  # outputs of layer1..layer4, [B, C_i, H_i, W_i]


def build_resnet(arch: str, zero_init_residual: bool = True, stem: Stem = "imagenet") -> nn.Module:
    """A randomly initialised torchvision ResNet (``zero_init_residual``: Goyal et al. 2017) with ``stem``."""
    try:
        resnet = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual)
    except ValueError:
        raise ValueError(f"model.arch: {arch!r} is not a torchvision model name") from None
    if stem == "small":
        use_small_stem(resnet)
    return resnet


def use_small_stem(resnet: nn.Module) -> None:
    """Swap ``conv1`` for a 3x3 stride-1 conv (initialised as torchvision initialises its convs) and drop the
    max-pooling: the stem of CIFAR-scale ResNets, which keeps 32 px inputs at 32 px into ``layer1``."""
    conv = nn.Conv2d(3, resnet.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    resnet.conv1, resnet.maxpool = conv, nn.Identity()


def block_channels(resnet: nn.Module) -> list[int]:
    """Output channels of layer1..layer4 (64..512 for BasicBlock nets, 256..2048 for Bottleneck)."""
    return [_block_out(getattr(resnet, name)) for name in BLOCK_NODES]


def _block_out(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def projection_head(in_dim: int, out_dim: int, mlp: bool) -> nn.Module:
    """MoCo v1's linear head, or MoCo v2's 2-layer MLP (Chen et al. 2020)."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class Encoder(nn.Module):
    """Backbone + head; returns the embedding and the four block outputs."""

    def __init__(
        self, arch: str, dim: int, mlp: bool, zero_init_residual: bool = True, stem: Stem = "imagenet"
    ):
        super().__init__()
        resnet = build_resnet(arch, zero_init_residual, stem)
        self.arch = arch
        self.channels = block_channels(resnet)
        nodes = {name: name for name in BLOCK_NODES} | {"flatten": "pooled"}
        self.backbone = create_feature_extractor(resnet, return_nodes=nodes)
        self.head = projection_head(resnet.fc.in_features, dim, mlp)

    def forward(self, images: Tensor) -> EncoderOutput:
        feats = self.backbone(images)
        return EncoderOutput(self.head(feats["pooled"]), [feats[name] for name in BLOCK_NODES])

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's weights under torchvision's names (no ``fc``), as contiguous fp32 CPU tensors."""
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in self.backbone.state_dict().items()
        }

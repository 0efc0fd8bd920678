"""MoCo v2 augmentations on the CPU with torchvision (the reference data path).

Chen et al. 2020 ("Improved Baselines with Momentum Contrastive Learning", MoCo v2): random
resized crop, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur
sigma in [0.1, 2] with p = 0.5 (from SimCLR, Chen et al. 2020), horizontal flip. Kaku et al. 2021
(official code) drop the crop for chest X-rays and fundus photos and add a 30-degree rotation.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ilm_dist.config import AugConfig


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel: about 10% of the image side, odd, at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def moco_view_transform(aug: AugConfig, image_size: int) -> v2.Compose:
    """One random view: PIL image -> normalised float tensor ``[3, S, S]``."""
    if aug.crop_scale is None:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        geometry = [v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), antialias=True)]
    ops = [
        v2.PILToTensor(),
        *geometry,
        v2.RandomApply([v2.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_p),
        v2.RandomGrayscale(p=aug.grayscale_p),
        v2.RandomApply(
            [v2.GaussianBlur(blur_kernel_size(image_size), sigma=tuple(aug.blur_sigma))], p=aug.blur_p
        ),
    ]
    if aug.rotation > 0:
        ops.append(v2.RandomRotation(aug.rotation))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]
    return v2.Compose(ops)


def eval_transform(aug: AugConfig, image_size: int) -> v2.Compose:
    """Deterministic evaluation view: resize to ``S x S`` and normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(aug.mean, aug.std),
        ]
    )

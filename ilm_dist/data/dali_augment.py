"""MoCo v2 augmentations as a DALI graph: the GPU twin of :mod:`ilm_dist.data.augment`.

Same operations, parameters and order as ``augment.MocoViews`` (Chen et al. 2020, MoCo v2;
blur from SimCLR, Chen et al. 2020; rotation and no-crop options from Kaku et al. 2021). Each
``RandomApply(p)`` is a DALI conditional on a per-sample coin flip, so the skipped samples cost nothing.
Known differences from torchvision, all within the augmentations' own randomness:

- colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision draws a
  random order per sample); hue is DALI's linear (YIQ) approximation of an HSV hue rotation;
- ``fn.random_resized_crop`` and ``fn.gaussian_blur`` resample and pad borders slightly differently;
- the horizontal flip is fused into the final normalisation (``fn.crop_mirror_normalize``), which it
  commutes with.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

from ilm_dist.config import AugConfig
from ilm_dist.data.augment import blur_kernel_size

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision default, used by MoCo v2)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale
FLIP_P = 0.5  # RandomHorizontalFlip (He et al. 2020; MoCo v2); RandomVerticalFlip where configured


def moco_view(image: DataNode, aug: AugConfig, size: int, layout: str) -> DataNode:
    """One random view of each decoded HWC uint8 RGB image -> normalised float32 ``size x size``."""
    image = _geometry(image, aug.crop_scale, size)
    image = _random_apply(aug.color_jitter_p, image, lambda x: _color_jitter(x, aug.color_jitter))
    image = _random_apply(aug.grayscale_p, image, _grayscale)
    kernel = blur_kernel_size(size)
    image = _random_apply(aug.blur_p, image, lambda x: _gaussian_blur(x, aug.blur_sigma, kernel))
    if aug.rotation > 0:
        # torchvision RandomRotation: uniform angle, nearest neighbour, same canvas, zero fill.
        angle = _uniform(-aug.rotation, aug.rotation)
        image = fn.rotate(image, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if aug.vflip:
        image = fn.flip(image, horizontal=0, vertical=fn.random.coin_flip(probability=FLIP_P))
    return fn.crop_mirror_normalize(
        image,
        mirror=fn.random.coin_flip(probability=FLIP_P) if aug.hflip else 0,
        mean=[255 * m for m in aug.mean],
        std=[255 * s for s in aug.std],
        dtype=types.FLOAT,
        output_layout=layout,
    )


def _geometry(image: DataNode, crop_scale: list[float] | None, size: int) -> DataNode:
    """RandomResizedCrop(scale=crop_scale) as in MoCo v2, or a plain resize when ``crop_scale`` is None."""
    if crop_scale is None:
        return fn.resize(image, size=[size, size], antialias=True)
    return fn.random_resized_crop(
        image,
        size=[size, size],
        random_area=list(crop_scale),
        random_aspect_ratio=list(CROP_RATIO),
        antialias=True,
    )


def _random_apply(p: float, image: DataNode, op) -> DataNode:
    """torchvision's ``RandomApply([op], p)``: ``op`` runs on the samples whose coin comes up."""
    if p >= 1:
        return op(image)
    if p <= 0:
        return image
    if fn.random.coin_flip(probability=p):
        image = op(image)
    return image


def _color_jitter(image: DataNode, jitter: list[float]) -> DataNode:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` factors (MoCo v2: 0.4, 0.4, 0.4, 0.1).

    Brightness scales, contrast blends with the image's mean grey level, saturation blends with the grey
    image (``fn.hsv``'s saturation is exactly that blend), hue shifts by up to ``hue`` turns.
    """
    brightness, contrast, saturation, hue = jitter
    x = fn.cast(image, dtype=types.FLOAT)
    if brightness > 0:
        x = _clamp(x * _jitter_factor(brightness))
    if contrast > 0:
        factor = _jitter_factor(contrast)
        x = _clamp(x * factor + _mean_luma(x) * (1 - factor))
    if saturation > 0 or hue > 0:
        hue_degrees = _uniform(-360 * hue, 360 * hue)
        x = _clamp(fn.hsv(x, saturation=_jitter_factor(saturation), hue=hue_degrees, dtype=types.FLOAT))
    return fn.cast(x, dtype=types.UINT8)


def _grayscale(image: DataNode) -> DataNode:
    """torchvision ``RandomGrayscale``: luma replicated to 3 channels (MoCo v2: p = 0.2)."""
    gray = fn.color_space_conversion(image, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(gray, gray, gray, axis=2)


def _gaussian_blur(image: DataNode, sigma: list[float], kernel: int) -> DataNode:
    """SimCLR's blur: sigma uniform in ``sigma`` (MoCo v2: [0.1, 2]), fixed window ``kernel``."""
    return fn.gaussian_blur(image, window_size=kernel, sigma=_uniform(*sigma))


def _jitter_factor(amount: float) -> DataNode | float:
    """torchvision's factor range for a jitter ``amount``: uniform in ``[max(0, 1 - amount), 1 + amount]``."""
    return _uniform(max(0.0, 1 - amount), 1 + amount)


def _uniform(low: float, high: float) -> DataNode | float:
    return fn.random.uniform(range=[low, high]) if high > low else float(low)


def _mean_luma(x: DataNode) -> DataNode:
    mean = fn.reductions.mean(x, axes=[0, 1])
    return mean[0] * LUMA[0] + mean[1] * LUMA[1] + mean[2] * LUMA[2]


def _clamp(x: DataNode) -> DataNode:
    return dmath.clamp(x, 0.0, 255.0)

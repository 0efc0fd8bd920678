"""MoCo v2 augmentations on the CPU: parameters drawn per sample, operations applied to a whole batch.

Chen et al. 2020 ("Improved Baselines with Momentum Contrastive Learning", MoCo v2): random resized crop,
colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur sigma in [0.1, 2] with
p = 0.5 (from SimCLR, Chen et al. 2020), horizontal flip. Kaku et al. 2021 (official code) drop the crop for
chest X-rays and fundus photos and add a 30-degree rotation.

The distributions, order and arithmetic are torchvision's (``RandomResizedCrop``, ``ColorJitter`` with its
random order per sample, ``RandomGrayscale``, ``GaussianBlur``, ``RandomRotation``, flips, ``Normalize``),
on float images in [0, 1]; tests/data/test_augment.py holds every view against torchvision's functional ops
applied one image at a time with the same parameters. Applied one image at a time, the ~30 small operations
of a view cost 0.4-0.8 ms at 32-64 px on one core, more than a ResNet-18 training step spends per image;
batched they cost a few percent of it (bench/NOTES.md, section h). Only the crop and resize stays one image at
a time (one ``interpolate`` per view: images differ in size).

A sample's parameters are drawn from a NumPy generator seeded by (seed, epoch, sample) in
:meth:`MocoViews.sample` (the loader's worker), and its views depend on nothing else: not the batch it lands
in, the worker count or the number of ranks (the data contract in :mod:`ilm_dist.data.batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from ilm_dist.config import AugConfig

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision default, used by MoCo v2)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale
FLIP_P = 0.5  # RandomHorizontalFlip (He et al. 2020; MoCo v2); RandomVerticalFlip where configured
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a central crop
# one view's parameters, one float each, in this order (what draw_view returns)
FIELDS = ("x0", "y0", "x1", "y1", "jitter", "o0", "o1", "o2", "o3", "brightness", "contrast", "saturation")
FIELDS += ("hue", "gray", "blur", "sigma", "angle", "hflip", "vflip")
COLUMN = {name: i for i, name in enumerate(FIELDS)}


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel: about 10% of the image side, odd, at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _coin(p: float, gen: np.random.Generator) -> bool:
    return p > 0 and gen.random() < p


def crop_box(height: int, width: int, scale: list[float] | None, gen: np.random.Generator) -> tuple[int, ...]:
    """``(x0, y0, x1, y1)`` of torchvision's ``RandomResizedCrop.get_params``; the whole image for None."""
    if scale is None:
        return 0, 0, width, height
    area, log_ratio = height * width, (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * gen.uniform(scale[0], scale[1])
        aspect = math.exp(gen.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(gen.integers(0, height - h + 1)), int(gen.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _jitter_range(value: float, center: float) -> tuple[float, float]:
    """ColorJitter's factor range for one setting: [max(0, 1 - v), 1 + v], or [-v, v] for hue."""
    return (-value, value) if center == 0 else (max(0.0, center - value), center + value)


def draw_view(aug: AugConfig, height: int, width: int, gen: np.random.Generator) -> tuple[float, ...]:
    """One view's parameters, one per name in ``FIELDS``, drawn as torchvision's transforms draw them (a
    factor is 1, or hue 0, where its setting is 0, as torchvision leaves that operation out)."""
    box = crop_box(height, width, aug.crop_scale, gen)
    jitter = _coin(aug.color_jitter_p, gen)
    order = gen.permutation(4).tolist()
    centers = (1.0, 1.0, 1.0, 0.0)
    factors = [
        gen.uniform(*_jitter_range(v, c)) if v > 0 else c
        for v, c in zip(aug.color_jitter, centers, strict=True)
    ]
    gray = _coin(aug.grayscale_p, gen)
    blur = _coin(aug.blur_p, gen)
    sigma = gen.uniform(*aug.blur_sigma) if blur else 1.0
    angle = gen.uniform(-aug.rotation, aug.rotation) if aug.rotation > 0 else 0.0
    hflip = aug.hflip and _coin(FLIP_P, gen)
    vflip = aug.vflip and _coin(FLIP_P, gen)
    flags = (jitter, *order, *factors, gray, blur, sigma, angle, hflip, vflip)
    return tuple(float(v) for v in (*box, *flags))


@dataclass
class SampleViews:
    """One decoded image (uint8 ``[H, W, 3]``) and the parameters of each of its views (``[V, len(FIELDS)]``)."""

    image: Tensor
    params: Tensor


class MocoViews:
    """``views`` random MoCo v2 views per sample: :meth:`sample` in the loader's worker, one image at a time
    (decode, draw), :meth:`collate` once per batch (every operation on the whole batch)."""

    def __init__(self, aug: AugConfig, image_size: int, views: int = 2):
        self.aug, self.size, self.views = aug, image_size, views

    def sample(self, pixels: Tensor, gen: np.random.Generator) -> SampleViews:
        """``pixels``: uint8 ``[H, W, 3]`` (``ShardReader.pixels``)."""
        height, width, _ = pixels.shape
        rows = [draw_view(self.aug, height, width, gen) for _ in range(self.views)]
        return SampleViews(pixels, torch.tensor(rows, dtype=torch.float64))

    def collate(self, samples: list[SampleViews]) -> list[Tensor]:
        """One normalised float ``[B, 3, S, S]`` tensor per view."""
        images = [s.image for s in samples]
        params = torch.stack([s.params for s in samples])  # [B, V, fields]
        views = []
        for v in range(self.views):
            crops = resized_crops(images, params[:, v, :4], self.size)
            views.append(self.finish(crops, params[:, v]))
        return views

    def finish(self, view: Tensor, params: Tensor) -> Tensor:
        """Everything after the crop, on float [B, 3, S, S] in [0, 1]: jitter, grayscale, blur, rotation,
        flips, normalisation."""
        aug, column = self.aug, params.T
        view = color_jitter(view, params, column[COLUMN["jitter"]].bool())
        view = torch.where(_per_sample(column[COLUMN["gray"]]), _gray(view).expand_as(view), view)
        blur = column[COLUMN["blur"]].bool()
        if blur.any():
            sigma = column[COLUMN["sigma"]][blur]
            view = _where(blur, view, lambda x: gaussian_blur(x, sigma, blur_kernel_size(self.size)))
        if aug.rotation > 0:
            view = rotate(view, column[COLUMN["angle"]])
        view = torch.where(_per_sample(column[COLUMN["hflip"]]), view.flip(-1), view)
        view = torch.where(_per_sample(column[COLUMN["vflip"]]), view.flip(-2), view)
        mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
        std = torch.tensor(aug.std).view(1, 3, 1, 1)
        return ((view - mean) / std).contiguous()


def _per_sample(flags: Tensor) -> Tensor:
    return flags.bool().view(-1, 1, 1, 1)


def _where(mask: Tensor, images: Tensor, op) -> Tensor:
    """``op`` applied to the images where ``mask`` is true."""
    if not mask.any():
        return images
    out = images.clone()
    out[mask] = op(images[mask])
    return out


def resized_crops(images: list[Tensor], boxes: Tensor, size: int) -> Tensor:
    """Each uint8 ``[H, W, 3]`` image's box ``(x0, y0, x1, y1)`` resized to ``size x size``, as float in [0, 1]:
    torchvision's ``resized_crop`` of a float image (bilinear, antialiased)."""
    out = torch.empty(len(images), 3, size, size)
    for slot, image, (x0, y0, x1, y1) in zip(out, images, boxes.long().tolist(), strict=True):
        crop = image[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        slot.copy_(resized[0])
    return out.div_(255.0)


def _gray(images: Tensor) -> Tensor:
    r, g, b = images.unbind(-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """torchvision's HSV hue rotation, with one shift per image."""
    maxc, _ = images.max(-3)
    minc, _ = images.min(-3)
    r, g, b = images.unbind(-3)
    span = maxc - minc
    flat = span == 0
    safe = torch.where(flat, torch.ones_like(span), span)
    sat = span / torch.where(flat, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = ((hue / 6.0 + 1.0) % 1.0 + shift.view(-1, 1, 1)) % 1.0
    h6 = hue * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    p = (maxc * (1 - sat)).clamp(0, 1)
    q = (maxc * (1 - sat * frac)).clamp(0, 1)
    t = (maxc * (1 - sat * (1 - frac))).clamp(0, 1)
    sector = sector.long() % 6
    table = torch.stack([maxc, p, q, t], -3)  # [B, 4, H, W]
    pick = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])[:, sector]
    return table.gather(-3, pick.movedim(0, -3))


def color_jitter(images: Tensor, params: Tensor, on: Tensor) -> Tensor:
    """ColorJitter where ``on``: the four operations in each sample's own order (``o0``-``o3``); an
    operation whose setting is 0 is left out, as torchvision leaves it out. Brightness, contrast and
    saturation all blend with something (black, the mean gray, the gray image): each order slot blends the
    whole batch at once, with factor 1 (the image itself, exactly) for samples doing something else there."""
    if not on.any():
        return images
    order = params[:, COLUMN["o0"] : COLUMN["o3"] + 1].long()
    factors = params[:, COLUMN["brightness"] : COLUMN["hue"] + 1].float()
    active = on[:, None] & (factors != torch.tensor([1.0, 1.0, 1.0, 0.0]))
    for slot in range(4):
        op = order[:, slot : slot + 1]
        doing = active.gather(1, op)[:, 0]
        blend = doing & (op[:, 0] < 3)
        if blend.any():
            factor = torch.where(blend, factors.gather(1, op)[:, 0], 1.0).view(-1, 1, 1, 1)
            gray = _gray(images)
            kind = op.view(-1, 1, 1, 1)
            other = torch.where(kind == 1, gray.mean((-3, -2, -1), keepdim=True), gray) * (kind != 0)
            images = _blend(images, other, factor)
        hue = doing & (op[:, 0] == 3)
        images = _where(hue, images, lambda x, shift=factors[hue, 3]: adjust_hue(x, shift))
    return images


def gaussian_blur(images: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """torchvision's GaussianBlur (separable, reflect padding), one sigma per image."""
    x = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel)
    weights = torch.exp(-0.5 * (x[None, :] / sigma.float()[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [B*3, k]
    n, c, h, w = images.shape
    flat = F.pad(images.reshape(1, n * c, h, w), [kernel // 2] * 4, mode="reflect")
    flat = F.conv2d(flat, weights[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, weights[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """torchvision's RandomRotation: counter-clockwise about the centre, nearest neighbour, zero fill."""
    theta = torch.deg2rad(degrees.float())
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


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

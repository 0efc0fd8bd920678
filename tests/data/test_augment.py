"""The batched MoCo v2 views (ilm_dist.data.augment) against torchvision's functional ops, one image at a
time with the same parameters, and the per-sample contract: a view depends on its sample alone."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ilm_dist.config import AugConfig
from ilm_dist.data.augment import (
    COLUMN,
    FIELDS,
    MocoViews,
    adjust_hue,
    blur_kernel_size,
    color_jitter,
    crop_box,
    draw_view,
    gaussian_blur,
    resized_crops,
    rotate,
)

SIZE = 32


def images(count: int, seed: int = 0, sizes=((50, 50), (47, 50), (50, 38))) -> list[Image.Image]:
    """Smooth random RGB images (colour gradients plus noise), of several sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 255, (3, 1, 1)) * (0.5 + 0.5 * np.stack([x, y, 1 - x]))
        pixels = np.clip(base + rng.normal(0, 20, (3, h, w)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels.transpose(1, 2, 0)))
    return out


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))


def as_float(image: Image.Image) -> torch.Tensor:
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)


def reference_finish(view: torch.Tensor, p, aug: AugConfig, size: int) -> torch.Tensor:
    """Everything after the crop, by torchvision's functional ops on one float image, with parameters ``p``."""
    if p["jitter"]:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
        for op in (int(p[f"o{slot}"]) for slot in range(4)):
            if aug.color_jitter[op] > 0:
                view = ops[op](view, factors[op])
    if p["gray"]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if p["blur"]:
        view = TF.gaussian_blur(view, [blur_kernel_size(size)] * 2, [p["sigma"]] * 2)
    if aug.rotation > 0:
        view = TF.rotate(view, p["angle"], interpolation=v2.InterpolationMode.NEAREST)
    if p["hflip"]:
        view = TF.horizontal_flip(view)
    if p["vflip"]:
        view = TF.vertical_flip(view)
    return TF.normalize(view, aug.mean, aug.std)


AUGS = {
    "mocov2": AugConfig(),
    "demo": AugConfig(crop_scale=[0.6, 1.0], color_jitter=[0.4, 0.4, 0.4, 0.5], grayscale_p=0.5, hflip=False),
    "xray": AugConfig(crop_scale=None, rotation=30.0, vflip=True, color_jitter=[0.4, 0.4, 0.0, 0.0]),
    "everything": AugConfig(color_jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, vflip=True, rotation=10.0),
}


def drawn(aug: AugConfig, count: int = 24):
    views, pics = MocoViews(aug, SIZE, views=2), images(count)
    gen = np.random.default_rng(1)
    return views, pics, [views.sample(pixels(image), gen) for image in pics]


def named(row: torch.Tensor) -> dict[str, float]:
    return dict(zip(FIELDS, row.tolist(), strict=True))


@pytest.mark.parametrize("name", AUGS)
def test_views_are_torchvisions_one_image_at_a_time(name):
    """Crop and resize, jitter in each sample's drawn order, grayscale, blur, rotation, flips and
    normalisation of a batch against torchvision's functional ops one image at a time, same parameters."""
    aug = AUGS[name]
    views, pics, samples = drawn(aug)
    batch = views.collate(samples)
    assert len(batch) == 2
    for v in range(2):
        assert batch[v].shape == (24, 3, SIZE, SIZE) and batch[v].dtype == torch.float32
        for i, (image, sample) in enumerate(zip(pics, samples, strict=True)):
            p = named(sample.params[v])
            x0, y0, x1, y1 = (int(p[k]) for k in ("x0", "y0", "x1", "y1"))
            crop = TF.resized_crop(as_float(image), y0, x0, y1 - y0, x1 - x0, [SIZE, SIZE], antialias=True)
            want = reference_finish(crop, p, aug, SIZE)
            if aug.rotation > 0:  # nearest neighbour: a sample on a pixel boundary may round either way
                assert (batch[v][i] - want).abs().gt(1e-4).float().mean() < 0.02, (name, v, i)
            else:
                torch.testing.assert_close(
                    batch[v][i], want, atol=1e-4, rtol=0, msg=f"{name} view {v} sample {i}"
                )


def test_a_view_depends_on_its_sample_alone():
    """The same sample and generator seed give the same views in any batch: with other images (of other
    sizes, so the padding differs) and at another position."""
    views, pics = MocoViews(AUGS["everything"], SIZE), images(12)

    def sample(i):
        return views.sample(pixels(pics[i]), np.random.default_rng(100 + i))

    alone = views.collate([sample(3)])
    crowd = views.collate([sample(i) for i in (7, 3, 0, 11)])
    for v in range(2):
        assert torch.equal(alone[v][0], crowd[v][1])


def test_parameters_follow_torchvisions_distributions():
    """Crop area and aspect ratio, factors and coin flips over many draws, against the configured ranges."""
    aug = AugConfig(crop_scale=[0.2, 1.0], color_jitter=[0.4, 0.3, 0.2, 0.1], rotation=30.0)
    gen = np.random.default_rng(0)
    rows = torch.tensor([draw_view(aug, 64, 64, gen) for _ in range(4000)])
    col = {k: rows[:, i] for k, i in COLUMN.items()}
    w, h = col["x1"] - col["x0"], col["y1"] - col["y0"]
    area = w * h / 64**2
    assert float(area.min()) > 0.19 and float(area.max()) <= 1.0
    assert float((w / h).min()) > 3 / 4 - 0.05 and float((w / h).max()) < 4 / 3 + 0.05
    assert (col["x0"] >= 0).all() and (col["x1"] <= 64).all() and (col["y1"] <= 64).all()
    for name, (low, high) in {
        "brightness": (0.6, 1.4),
        "contrast": (0.7, 1.3),
        "saturation": (0.8, 1.2),
    }.items():
        assert low <= float(col[name].min()) < low + 0.01 and high - 0.01 < float(col[name].max()) <= high
    assert float(col["hue"].abs().max()) <= 0.1 and float(col["angle"].abs().max()) <= 30
    for name, p in {"jitter": 0.8, "gray": 0.2, "blur": 0.5, "hflip": 0.5, "vflip": 0.0}.items():
        assert abs(float(col[name].mean()) - p) < 0.03, name
    orders = {tuple(r) for r in rows[:, COLUMN["o0"] : COLUMN["o3"] + 1].long().tolist()}
    assert len(orders) == 24  # every order of the four jitter operations occurs


def test_crop_box_falls_back_to_a_central_crop_like_torchvision():
    """A 10 x 100 image admits no box of aspect 3/4..4/3 at scale 0.9-1: torchvision's fallback."""
    box = crop_box(10, 100, [0.9, 1.0], np.random.default_rng(0))
    i, j, h, w = v2.RandomResizedCrop(8, scale=(0.9, 1.0)).make_params([torch.zeros(3, 10, 100)]).values()
    assert box == (j, i, j + w, i + h) == (43, 0, 56, 10)


def test_batched_operations_against_torchvision():
    rng = torch.Generator().manual_seed(0)
    batch = torch.rand(6, 3, 20, 20, generator=rng)
    shifts = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.33, 0.5])
    hue = adjust_hue(batch, shifts)
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(hue[i], TF.adjust_hue(batch[i], s), atol=1e-5, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    blurred = gaussian_blur(batch, sigma, 5)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(batch[i], [5, 5], [s, s]), atol=1e-5, rtol=0)
    angles = torch.tensor([-30.0, -5.0, 0.0, 12.0, 29.0, 90.0])
    turned = rotate(batch, angles)
    for i, a in enumerate(angles.tolist()):
        want = TF.rotate(batch[i], a, interpolation=v2.InterpolationMode.NEAREST)
        assert (turned[i] != want).float().mean() < 0.02, a  # nearest neighbour: ties may round apart


def test_color_jitter_skips_what_is_off_and_keeps_the_rest():
    batch = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = torch.zeros(4, len(FIELDS), dtype=torch.float64)
    params[:, COLUMN["o0"] : COLUMN["o3"] + 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    params[:, COLUMN["brightness"] : COLUMN["hue"] + 1] = torch.tensor([1.5, 1.0, 1.0, 0.0])
    out = color_jitter(batch, params, torch.tensor([True, False, True, False]))
    torch.testing.assert_close(out[0], (batch[0] * 1.5).clamp(0, 1))
    assert torch.equal(out[1], batch[1]) and torch.equal(out[3], batch[3])


def test_resized_crop_of_the_whole_image_at_its_own_size_is_the_image():
    pixels = [torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8) for _ in range(2)]
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    want = torch.stack([p.permute(2, 0, 1).float() / 255 for p in pixels])
    torch.testing.assert_close(resized_crops(pixels, boxes, 16), want, atol=1e-6, rtol=0)


def test_one_view_for_fine_tuning():
    views = MocoViews(AugConfig(), SIZE, views=1)
    gen = np.random.default_rng(0)
    out = views.collate([views.sample(pixels(image), gen) for image in images(3)])
    assert len(out) == 1 and out[0].shape == (3, 3, SIZE, SIZE) and math.isfinite(float(out[0].sum()))

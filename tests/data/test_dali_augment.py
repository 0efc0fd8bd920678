"""ilm_dist.data.dali_augment on DALI's CPU backend: each operation's effect read back from hand-made images
against its formula (normalisation, ITU-R 601 luma, brightness factor range, flips as exact mirrors)."""

from dataclasses import replace

import numpy as np
import pytest

dali = pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from ilm_dist.config import AugConfig  # noqa: E402
from ilm_dist.data.dali_augment import LUMA, moco_view  # noqa: E402

SIZE, BATCH = 16, 32
NO_AUG = AugConfig(crop_scale=None, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, hflip=False)
MEAN, STD = np.array(NO_AUG.mean), np.array(NO_AUG.std)


def images(seed: int = 0) -> list[np.ndarray]:
    """BATCH random uint8 HWC images, SIZE x SIZE (no resampling needed)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(BATCH)]


def views(batch: list[np.ndarray], aug: AugConfig, layout: str = "HWC") -> list[np.ndarray]:
    """moco_view of each image, run once on the CPU; returned as pixel values (normalisation undone), HWC."""

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=7, enable_conditionals=True)
    def pipe():
        return moco_view(fn.external_source(source=[batch], layout="HWC"), aug, SIZE, layout)

    p = pipe()
    p.build()
    (out,) = p.run()
    arrays = [np.asarray(out[i]) for i in range(BATCH)]
    if layout == "CHW":
        arrays = [a.transpose(1, 2, 0) for a in arrays]
    return [(a * STD + MEAN) * 255 for a in arrays]


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_without_augmentations_the_view_is_the_normalised_image(layout):
    batch = images()
    for image, view in zip(batch, views(batch, NO_AUG, layout), strict=True):
        np.testing.assert_allclose(view, image, atol=1e-3)


def test_grayscale_is_itu_601_luma_in_every_channel():
    batch = images(1)
    for image, view in zip(batch, views(batch, replace(NO_AUG, grayscale_p=1.0)), strict=True):
        luma = image.astype(float) @ np.array(LUMA)
        for channel in range(3):
            np.testing.assert_allclose(view[..., channel], luma, atol=1.01)  # DALI rounds to uint8


def test_brightness_scales_each_image_by_one_factor_in_its_range():
    batch = [np.full((SIZE, SIZE, 3), 100, dtype=np.uint8) for _ in range(BATCH)]
    aug = replace(NO_AUG, color_jitter=[0.4, 0.0, 0.0, 0.0], color_jitter_p=1.0)
    factors = np.array([view.mean() / 100 for view in views(batch, aug)])
    assert np.all((factors > 0.6 - 0.01) & (factors < 1.4 + 0.01))
    assert factors.std() > 0.1  # uniform on [0.6, 1.4]: sd 0.23


@pytest.mark.parametrize(("flag", "axis"), [("hflip", 1), ("vflip", 0)])
def test_flips_mirror_about_half_of_the_images(flag, axis):
    batch = images(2)
    flipped = []
    for image, view in zip(batch, views(batch, replace(NO_AUG, **{flag: True})), strict=True):
        same, mirrored = (
            np.allclose(view, image, atol=1e-3),
            np.allclose(view, np.flip(image, axis), atol=1e-3),
        )
        assert same != mirrored
        flipped.append(mirrored)
    assert 0 < sum(flipped) < BATCH  # p = 0.5 over 32 images

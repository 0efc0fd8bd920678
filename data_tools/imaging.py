"""Decoding, colour normalisation and JPEG re-encoding.

Colour policy: every image is first brought to 8-bit ``L`` or ``RGB``:

- ``1``/``L`` stay ``L``; 16/32-bit integer and float images (``I;16``, ``I``, ``F``) become ``L``,
  scaled by 1/257 when they hold 16-bit values (otherwise taken as 0-255);
- images with alpha (``RGBA``, ``LA``, ``PA``, palettes with transparency) are composited onto black
  (a no-op for fully opaque images) and become ``RGB``; palette and other colour modes become ``RGB``.

An image has *grayscale content* when it is ``L`` or its three channels are identical.  The output mode is
one per dataset (``manifest.image_mode``): ``L`` when every image has grayscale content (so RGB/RGBA files
holding a gray picture, e.g. the NIH PNGs, give 1-channel JPEGs), otherwise ``RGB`` (gray images are then
replicated to 3 channels); ``--image-mode`` forces either (``L`` from colour uses ITU-R 601 luma).
DICOM files (``.dcm``) are converted to 8 bits as `data_tools.dicom` describes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from data_tools import dicom
from data_tools.errors import BadImage, PackError
from data_tools.records import FileRef, ImageRef

IMAGE_MODES = ("L", "RGB")


def load(ref: ImageRef) -> Image.Image:
    """Decode fully (truncation shows up here), apply EXIF orientation, return 8-bit ``L`` or ``RGB``."""
    return decode(ref)[0]


def decode(ref: ImageRef) -> tuple[Image.Image, dict | None]:
    """`load`, and for a DICOM file the attributes its conversion used (see `data_tools.dicom`)."""
    try:
        if isinstance(ref, FileRef) and dicom.is_dicom(ref.path):
            image, attributes = dicom.read(ref.path)
            return _canonical(image), attributes
        with ref.open() as image:
            image.load()
            return _canonical(ImageOps.exif_transpose(image)), None
    except (BadImage, PackError):
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ... for bad files
        raise BadImage(f"cannot decode image ({type(err).__name__}: {err})") from None


def _canonical(image: Image.Image) -> Image.Image:
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def is_grayscale(image: Image.Image) -> bool:
    """True for ``L`` images and ``RGB`` images whose three channels are identical."""
    if image.mode == "L":
        return True
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def probe(ref: ImageRef, min_side: int | None, fundus: int | None = None) -> tuple[bool, dict | None]:
    """Check that an image decodes, is large enough and (with ``fundus``) shows a fundus disc; return
    whether its content is grayscale, and the DICOM attributes used (None for other formats)."""
    image, attributes = decode(ref)
    if min_side is not None and min(image.size) < min_side:
        width, height = image.size
        raise BadImage(f"image is {width}x{height}, smaller than --min-side {min_side}")
    if fundus is not None:
        image = crop_fundus(image, fundus)
    return is_grayscale(image), attributes


# Fundus photographs (diabetic retinopathy, EyePACS): the preprocessing of the JAMA 2016 replication
# (Voets et al. 2019, "Reproduction study using public data of: Development and validation of a deep
# learning algorithm for detection of diabetic retinopathy in retinal fundus photographs"), which Kaku et
# al. 2021 used for their DR set: find the fundus disc as the largest bright region, centre it in a black
# square whose side is its diameter, and resize so that the diameter is the target (299 px).
FUNDUS_LEVEL = 12  # the replication's contrast curve (255/1.3)(x/170)^2 sends intensities below ~12 to 0
MIN_DISC = 0.25  # smallest disc diameter, as a fraction of the image's shorter side (the replication: 200 px)


def crop_fundus(image: Image.Image, size: int) -> Image.Image:
    """The fundus disc centred in a ``size x size`` square with black corners.

    The disc is the largest connected region brighter than `FUNDUS_LEVEL`; its bounding box gives the centre
    and the diameter (the longer side: photographs often cut the disc at the top and bottom).
    """
    bright = np.asarray(image.convert("L")) > FUNDUS_LEVEL
    regions, count = ndimage.label(bright)
    if count == 0:
        raise BadImage("no fundus disc found (the image is dark everywhere)")
    disc = regions == 1 + int(np.argmax(ndimage.sum_labels(bright, regions, range(1, count + 1))))
    rows, cols = np.flatnonzero(disc.any(axis=1)), np.flatnonzero(disc.any(axis=0))
    diameter = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    if diameter < MIN_DISC * min(image.size):
        raise BadImage(
            f"no fundus disc found (the largest bright region is {diameter} px across, under "
            f"{MIN_DISC:g} of the image's shorter side)"
        )
    cx, cy = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
    half = diameter / 2
    box = (round(cx - half), round(cy - half), round(cx - half) + diameter, round(cy - half) + diameter)
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS)  # crop pads with black


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert a canonical ``L``/``RGB`` image to the dataset's mode (gray RGB → ``L`` exactly)."""
    if image.mode == mode:
        return image
    if mode == "L" and is_grayscale(image):
        return image.getchannel(0)
    return image.convert(mode)


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is at most ``max_side``, keeping the aspect ratio (never enlarges)."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes (1 channel for ``L``, 3 for ``RGB``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def render(ref: ImageRef, mode: str, quality: int, max_side: int | None, fundus: int | None = None) -> bytes:
    """Load, (crop the fundus disc,) convert, downscale and JPEG-encode one image."""
    image = load(ref)
    if fundus is not None:
        image = crop_fundus(image, fundus)
    return encode_jpeg(downscale(to_mode(image, mode), max_side), quality)

"""DICOM input (``.dcm`` files) with pydicom, an optional dependency (``pip install 'ilm_dist[dicom]'``).

Grayscale images (MONOCHROME1/2) become 8-bit ``L`` in the order of the DICOM display pipeline
(PS3.3 C.11, "Softcopy Presentation State"):

1. the stored values, decoded by pydicom (uncompressed, RLE, and whatever compressed transfer syntaxes the
   installed pydicom plugins decode);
2. the modality transform: Rescale Slope/Intercept, or a Modality LUT Sequence (``apply_modality_lut``);
3. the VOI transform, the first of
   - the first VOI LUT Sequence item (`voi_lut`), scaled from its entry range
     ``0 .. 2**bits - 1`` (LUT Descriptor) to 0..255;
   - the first Window Center/Width, with the VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID, PS3.3
     C.11.2.1.2-3), mapping the window to 0..255;
   - none present: the image's own minimum..maximum mapped linearly to 0..255 (``minmax``), which is how
     12- and 16-bit images without a window reach 8 bits;
4. MONOCHROME1 (white = low values) inverted, so that 255 is always white.

Colour images (RGB, and YBR that pydicom converts to RGB) with 8 bits per sample stay RGB. Multi-frame
images, other photometric interpretations and other bit depths for colour are bad images. A transfer syntax
that no installed plugin can decode is an error naming the file and the plugins to install (not a bad
image: it would drop every such file). ``manifest.json`` records the policy and how many images used
each attribute (`summarise`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.errors import BadImage, PackError

SUFFIXES = (".dcm", ".dicom")
POLICY = (
    "modality LUT (Rescale Slope/Intercept), then the first VOI LUT, else the first window "
    "(VOI LUT Function), else the image's min..max, mapped to 0..255; MONOCHROME1 inverted; "
    "8-bit RGB kept; see data_tools/dicom.py"
)


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def read(path: Path) -> tuple[Image.Image, dict]:
    """The 8-bit ``L``/``RGB`` image of one DICOM file, and the attributes its conversion used."""
    pydicom = _pydicom(path)
    try:
        with warnings.catch_warnings():  # pydicom warns about harmless deviations from the standard
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        raise BadImage("not a DICOM file (no DICM preamble)") from None
    if "PixelData" not in ds:
        raise BadImage("DICOM file without pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImage(f"DICOM file with {frames} frames; only single-frame images are packed")
    if not _syntax(ds).is_encapsulated:
        _check_length(ds)
    pixels = _decode(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    attrs = {
        "transfer_syntax": _syntax(ds).name,
        "photometric": photometric,
        "bits_stored": int(ds.get("BitsStored", 0)),
    }
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray, used = to_gray8(pixels, ds)
        return Image.fromarray(gray, "L"), attrs | used
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
        return Image.fromarray(pixels, "RGB"), attrs | {"voi": "none (colour)"}
    raise BadImage(
        f"DICOM {photometric} with {attrs['bits_stored']} bits is not supported (expected MONOCHROME1/2 or 8-bit colour)"
    )


def to_gray8(pixels: np.ndarray, ds) -> tuple[np.ndarray, dict]:
    """Modality and VOI transforms, MONOCHROME1 inversion: uint8 pixels, and what was applied."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    used = {"rescale": "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds}
    if "VOILUTSequence" in ds:
        scaled = voi_lut(values, ds.VOILUTSequence[0])
        used["voi"] = "lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        scaled = window(values, center, width, function)
        used |= {"voi": "window", "voi_function": function}
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        used["voi"] = "minmax"
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 255 - gray
    return gray, used


def voi_lut(values: np.ndarray, item) -> np.ndarray:
    """A VOI LUT Sequence item to 0..255 (PS3.3 C.11.2.1.1): inputs below the first mapped value take the
    first entry, above the last the last one; entries scaled from ``0 .. 2**bits - 1``.  (pydicom 3.0's
    ``apply_voi_lut`` indexes an 8-bit LUT with 8-bit indices, which wrap for LUTs of over 256 entries.)"""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16  # PS3.3 C.11.1.1: 0 means 65536
    if item["LUTData"].VR == "OW":  # raw bytes: 16-bit entries
        table = np.frombuffer(item.LUTData, dtype="<u2").astype(np.float64)
    else:
        table = np.asarray(item.LUTData, dtype=np.float64).reshape(-1)
    if len(table) != entries or bits not in (8, *range(10, 17)):
        raise BadImage(f"DICOM VOI LUT with descriptor {list(item.LUTDescriptor)} and {len(table)} entries")
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    return table[index] * (255 / (2**bits - 1))


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM window to 0..255 (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.1 SIGMOID, C.11.2.1.3.2 LINEAR_EXACT)."""
    if function == "SIGMOID":
        if width <= 0:
            raise BadImage(f"DICOM window width {width} must be > 0 for SIGMOID")
        return 255 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise BadImage(f"DICOM window width {width} must be > 0 for LINEAR_EXACT")
        return np.clip(((values - center) / width + 0.5) * 255, 0, 255)
    if function != "LINEAR":
        raise BadImage(f"DICOM VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    if width < 1:
        raise BadImage(f"DICOM window width {width} must be >= 1 for LINEAR")
    return np.clip(((values - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)


def summarise(attributes: list[dict]) -> dict:
    """The manifest's ``dicom`` entry: the policy and how many images had each attribute value."""
    counts: dict[str, Counter] = {}
    for attrs in attributes:
        for key, value in attrs.items():
            counts.setdefault(key, Counter())[str(value)] += 1
    return {
        "policy": POLICY,
        "files": len(attributes),
        **{k: dict(sorted(c.items())) for k, c in counts.items()},
    }


def _first(value) -> float:
    """Window Center/Width may hold several windows (VM 1-n): the first one."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _syntax(ds):
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    return (
        meta.TransferSyntaxUID if meta is not None and "TransferSyntaxUID" in meta else ImplicitVRLittleEndian
    )


def _check_length(ds) -> None:
    """Uncompressed pixel data is as long as the header says, plus at most the pad byte to an even length
    (pydicom would read extra bytes as further frames, or drop them as padding)."""
    shape = [ds.get(key) for key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    if not all(isinstance(value, int) for value in shape):
        return  # a missing attribute: pydicom's decoding names it
    rows, columns, samples, bits = shape
    size = -(-rows * columns * samples * bits // 8)
    if len(ds.PixelData) not in (size, size + size % 2):
        raise BadImage(
            f"DICOM pixel data is {len(ds.PixelData)} bytes, but the header's {rows} rows x {columns} columns "
            f"x {samples} sample(s) x {bits} bits allocated make {size} bytes"
        )


def _decode(path: Path, ds) -> np.ndarray:
    """``ds.pixel_array``, with a PackError naming the file when no installed plugin can decode it."""
    from pydicom.pixels.decoders.base import get_decoder

    syntax = _syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise PackError(
            f"{path}: no pydicom decoder exists for the transfer syntax {syntax.name} ({syntax})"
        ) from None
    if not decoder.is_available:
        raise PackError(
            f"{path}: pixel data is {syntax.name} ({syntax}), which no installed pydicom plugin decodes; "
            f"install one of: {'; '.join(decoder.missing_dependencies)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (ValueError, EOFError, OSError, AttributeError) as err:  # truncated, inconsistent, incomplete
        raise BadImage(f"cannot decode DICOM pixel data ({err})") from None
    except RuntimeError as err:  # every available plugin failed (e.g. 12-bit JPEG with Pillow)
        reason = " ".join(str(err).split())
        raise PackError(
            f"{path}: cannot decode {syntax.name} pixel data with the installed plugins ({reason})"
        ) from None


def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise PackError(f"{path}: reading DICOM needs pydicom: pip install 'ilm_dist[dicom]'") from None
    return pydicom

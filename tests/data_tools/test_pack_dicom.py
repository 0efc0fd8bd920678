"""DICOM input (issue #13): the display pipeline against formulas recomputed here in float64, on the DICOM
files pydicom ships (no downloads), and the packed output and manifest."""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_charset_files, get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from data_tools import dicom  # noqa: E402
from data_tools.errors import BadImage, PackError  # noqa: E402
from ilm_dist.data.manifest import load_manifest  # noqa: E402
from tests.data_tools.test_pack import pack, read_dataset  # noqa: E402
from tests.data_tools.test_pack_strict import pack_cli  # noqa: E402
from tests.integration.test_run_safety import assert_one_line_error, tree  # noqa: E402


def shipped(name: str) -> Path:
    found = get_testdata_file(name) or next(iter(get_charset_files(name)), None)
    assert found is not None, f"pydicom does not ship {name}"
    return Path(found)


def dataset(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(shipped(name))


def converted(path: Path) -> tuple[np.ndarray, dict]:
    image, attrs = dicom.read(path)
    return np.asarray(image), attrs


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out case by case, to 0..255."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.where(x <= low, 0, np.where(x > high, 255, inside)))


def test_window_center_width_mr() -> None:
    ds = dataset("MR_small.dcm")  # 16-bit, Window Center 600 / Width 1600, no rescale
    got, attrs = converted(shipped("MR_small.dcm"))
    expected = linear_window(ds.pixel_array.astype(np.float64), 600.0, 1600.0)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    assert attrs == {
        "transfer_syntax": "Explicit VR Little Endian",
        "photometric": "MONOCHROME2",
        "bits_stored": 16,
        "rescale": False,
        "voi": "window",
        "voi_function": "LINEAR",
    }


def test_the_first_of_several_windows_is_used() -> None:
    ds = dataset("examples_overlay.dcm")  # 12 bits, Window Center [450, 200] / Width [790, 443]
    got, attrs = converted(shipped("examples_overlay.dcm"))
    assert np.array_equal(got, linear_window(ds.pixel_array.astype(np.float64), 450.0, 790.0))
    assert attrs["bits_stored"] == 12 and attrs["voi"] == "window"


def test_rescale_then_min_max_ct() -> None:
    ds = dataset("CT_small.dcm")  # Rescale Intercept -1024, slope 1, no window
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got, attrs = converted(shipped("CT_small.dcm"))
    assert np.array_equal(got, np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255))
    assert attrs["rescale"] is True and attrs["voi"] == "minmax"


def _modified(tmp_path: Path, name: str, change) -> Path:
    ds = dataset(name)
    change(ds)
    path = tmp_path / f"modified_{name}"
    ds.save_as(path)
    return path


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono1 = _modified(
        tmp_path, "MR_small.dcm", lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1")
    )
    mono2, _ = converted(shipped("MR_small.dcm"))
    got, attrs = converted(mono1)
    assert attrs["photometric"] == "MONOCHROME1" and np.array_equal(got, 255 - mono2)


def test_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    first, entries = 100, 1024
    table = (np.arange(entries) * 255 // (entries - 1)).astype(np.uint16)[::-1]  # a decreasing 8-bit LUT

    def add_lut(ds) -> None:
        item = Dataset()
        item.LUTDescriptor = [entries, first, 8]
        item.add_new(0x00283006, "US", table.tolist())  # LUT Data
        ds.VOILUTSequence = [item]

    got, attrs = converted(_modified(tmp_path, "MR_small.dcm", add_lut))
    x = dataset("MR_small.dcm").pixel_array.astype(np.int64)
    expected = table[np.clip(x - first, 0, entries - 1)]  # 8-bit entries: already 0..255
    assert attrs["voi"] == "lut" and np.array_equal(got, expected)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(tmp_path: Path, function: str) -> None:
    got, attrs = converted(
        _modified(tmp_path, "MR_small.dcm", lambda ds: setattr(ds, "VOILUTFunction", function))
    )
    x = dataset("MR_small.dcm").pixel_array.astype(np.float64)
    if function == "SIGMOID":
        expected = 255 / (1 + np.exp(-4 * (x - 600) / 1600))
    else:
        expected = np.clip(((x - 600) / 1600 + 0.5) * 255, 0, 255)
    assert attrs["voi_function"] == function and np.array_equal(got, np.rint(expected))


def test_rle_decodes_like_the_uncompressed_file() -> None:
    assert np.array_equal(converted(shipped("MR_small_RLE.dcm"))[0], converted(shipped("MR_small.dcm"))[0])


def test_rgb_stays_rgb() -> None:
    got, attrs = converted(shipped("examples_rgb_color.dcm"))
    assert got.ndim == 3 and np.array_equal(got, dataset("examples_rgb_color.dcm").pixel_array)
    assert attrs["voi"] == "none (colour)"


def test_undecodable_transfer_syntax_names_the_file() -> None:
    path = shipped("MR_small_jpeg_ls_lossless.dcm")  # JPEG-LS: no plugin in a plain pydicom install
    from pydicom.pixels.decoders.base import get_decoder

    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS plugin is installed here")
    with pytest.raises(PackError) as caught:
        dicom.read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: pixel data is JPEG-LS Lossless Image Compression")
    assert "install one of" in message and "\n" not in message


def test_bad_dicom_files_are_bad_images(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="2 frames"):
        dicom.read(shipped("SC_rgb_rle_2frame.dcm"))
    with pytest.raises(BadImage, match=r"pixel data is 8130 bytes, but the header's 64 rows .* make 8192"):
        dicom.read(shipped("MR_truncated.dcm"))
    with pytest.raises(BadImage, match=r"cannot decode DICOM pixel data \(Missing .*'Rows'\)"):
        dicom.read(_modified(tmp_path, "MR_small.dcm", lambda ds: delattr(ds, "Rows")))
    (tmp_path / "fake.dcm").write_bytes(b"not dicom at all" * 20)
    with pytest.raises(BadImage, match="not a DICOM file"):
        dicom.read(tmp_path / "fake.dcm")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"Columns": 32}, "64 rows x 32 columns x 1 sample(s) x 16 bits allocated make 4096 bytes"),
        ({"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, "64 rows x 64 columns x 1 sample(s) x 8 bits"),
        (
            {"SamplesPerPixel": 3, "Rows": 16},
            "16 rows x 64 columns x 3 sample(s) x 16 bits allocated make 6144",
        ),
    ],
    ids=["columns", "bits", "samples"],
)
def test_pixel_data_longer_than_the_header_says_is_a_bad_image(
    tmp_path: Path, change: dict, expected: str
) -> None:
    path = _modified(tmp_path, "MR_small.dcm", lambda ds: [setattr(ds, k, v) for k, v in change.items()])
    with pytest.raises(BadImage) as caught:
        dicom.read(path)
    assert caught.value.reason.startswith("DICOM pixel data is 8192 bytes, but the header's ")
    assert expected in caught.value.reason


def test_pack_names_a_pixel_data_header_mismatch(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(4):
            shutil.copy(shipped("MR_small.dcm"), tmp_path / "src" / label / f"{i}.dcm")
    odd = _modified(tmp_path, "MR_small.dcm", lambda ds: setattr(ds, "Rows", 32))
    odd.rename(tmp_path / "src" / "b" / "odd.dcm")
    before = tree(tmp_path)
    proc = pack_cli(tmp_path / "src", tmp_path / "out")
    assert_one_line_error(
        proc,
        f"error: {tmp_path / 'src' / 'b' / 'odd.dcm'}: DICOM pixel data is 8192 bytes, but the header's 32 "
        "rows x 64 columns x 1 sample(s) x 16 bits allocated make 4096 bytes (pass --skip-bad",
    )
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["src"]
    proc = pack_cli(tmp_path / "src", tmp_path / "out", "--skip-bad", "--split-fractions", "0.5,0.25,0.25")
    assert proc.returncode == 0, proc.stderr
    skipped = load_manifest(tmp_path / "out").raw["skipped"]["files"]
    assert [entry["path"] for entry in skipped] == ["b/odd.dcm"] and "32 rows" in skipped[0]["reason"]


def test_pack_a_dicom_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for label, names in {"ct": ["CT_small.dcm"], "mr": ["MR_small.dcm", "MR_small_RLE.dcm"]}.items():
        for copy in range(4):
            for name in names:
                (tmp_path / "src" / label).mkdir(parents=True, exist_ok=True)
                shutil.copy(shipped(name), tmp_path / "src" / label / f"{copy}_{name}")
    assert pack(tmp_path / "src", tmp_path / "out", "--split-fractions", "0.5,0.25,0.25") == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.image_mode == "L" and manifest.class_names == ("ct", "mr")
    entry = manifest.raw["dicom"]
    assert entry["files"] == 12 and entry["policy"] == dicom.POLICY
    assert entry["voi"] == {"minmax": 4, "window": 8} and entry["rescale"] == {"False": 8, "True": 4}
    assert entry["transfer_syntax"] == {"Explicit VR Little Endian": 8, "RLE Lossless": 4}
    expected = {name: converted(shipped(name))[0] for name in ("CT_small.dcm", "MR_small.dcm")}
    for samples in read_dataset(tmp_path / "out").values():
        for sample in samples:
            reference = expected["CT_small.dcm" if "CT" in sample["meta"]["source"] else "MR_small.dcm"]
            assert np.abs(sample["image"].astype(int) - reference).mean() < 3  # JPEG q95 of the 8-bit image


def test_pack_refuses_an_undecodable_dicom(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS plugin is installed here")
    for label in ("a", "b"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(3):
            shutil.copy(shipped("MR_small.dcm"), tmp_path / "src" / label / f"{i}.dcm")
    shutil.copy(shipped("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "src" / "b" / "compressed.dcm")
    assert pack(tmp_path / "src", tmp_path / "out", "--skip-bad") == 2  # not skippable: it is the setup
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'src' / 'b' / 'compressed.dcm'}: pixel data is JPEG-LS")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_decoded_jpeg_bytes_are_plain_images() -> None:
    image, _ = dicom.read(shipped("MR_small.dcm"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert Image.open(buffer).mode == "L"

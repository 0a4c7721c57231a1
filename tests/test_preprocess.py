"""Tests of the one preprocessing path: header checks, pixel pipeline, crop and orientation.

Test objects are real GE Senographe headers with real mini-MIAS pixels (tests/dicom_factory.py),
mostly at a quarter of the film's resolution (256 x 256) to keep the module fast.
"""

from __future__ import annotations

import copy
import gzip
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels.processing import apply_windowing
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless

import dicom_factory
from model import breast, dicom_pixels
from model.preprocess import (
    OUTPUT_SIZE,
    PREPROCESSING_VERSION,
    PreprocessingError,
    UnsupportedView,
    check_scorable,
    preprocess_array,
    preprocess_dataset,
    preprocess_file,
)

# Largest absolute difference allowed between arrays that should be equal up to float32
# rounding (same values, different summation order).
EXACT = 1e-5
# Largest absolute difference allowed between bit-depth twins: the factory rounds window
# centre and width to integers at each bit depth, which moves the sigmoid slightly.
BIT_DEPTH_TOLERANCE = 2e-3
# Largest absolute difference allowed between a film file and the same film in DICOM:
# 8-bit values go through 12-bit stored values (rounded) and back.
ONE_PATH_TOLERANCE = 1e-3

LEFT_FILM = 4  # mdb004, a normal left MLO film
RIGHT_FILM = 3  # mdb003, the same woman's right film


@pytest.fixture(scope="module")
def film(data_dir: Path) -> np.ndarray:
    """mdb004 at quarter resolution, uint8 256 x 256, chest wall on the left."""
    return dicom_factory.load_mias(LEFT_FILM)[::4, ::4].copy()


def mammogram(pixels8: np.ndarray, laterality: str = "L", view: str = "MLO", **options) -> Dataset:
    bits = options.pop("bits_stored", 12)
    return dicom_factory.make_mammogram(dicom_factory.to_bits(pixels8, bits), laterality, view, bits_stored=bits, **options)


def reread(ds: Dataset) -> Dataset:
    """Write ``ds`` as a Part 10 file in memory and read it back, as the worker would."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.Rows, ds.Columns = stored.shape
    dtype = "<i2" if stored.dtype.kind == "i" else "<u2"
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()


def first_window(ds: Dataset) -> tuple[float, float]:
    center, width = ds.WindowCenter, ds.WindowWidth
    if isinstance(center, pydicom.multival.MultiValue):
        center, width = center[0], width[0]
    return float(center), float(width)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# --------------------------------------------------------------------------- output


def test_output_dtype_shape_range(film: np.ndarray) -> None:
    timings: dict[str, float] = {}
    view = preprocess_dataset(mammogram(film), timings=timings)

    assert view.image.dtype == np.float32
    assert view.image.shape == (OUTPUT_SIZE, OUTPUT_SIZE)
    assert float(view.image.min()) >= 0.0
    assert float(view.image.max()) <= 1.0
    assert float(view.image.max()) > 0.5
    assert view.metadata.laterality == "L"
    assert view.metadata.view_position == "MLO"
    assert view.metadata.source_shape == (256, 256)
    assert view.metadata.preprocessing_version == PREPROCESSING_VERSION
    assert view.metadata.flipped is False
    assert set(timings) == {"decode_ms", "preprocess_ms"}
    assert all(value >= 0 for value in timings.values())


def test_output_size_argument(film: np.ndarray) -> None:
    view = preprocess_dataset(mammogram(film), size=64)
    assert view.image.shape == (64, 64)
    with pytest.raises(ValueError, match="size is 0"):
        preprocess_dataset(mammogram(film), size=0)


def test_area_resize_matches_pillow_box_at_integer_ratio() -> None:
    rng = np.random.default_rng(0)
    crop = rng.random((512, 300), dtype=np.float32)
    square = np.zeros((512, 512), dtype=np.float32)
    square[:, :300] = crop
    expected = np.asarray(Image.fromarray(square).resize((128, 128), Image.Resampling.BOX))

    resized = breast.square_resize(crop, 128)

    assert np.abs(resized - expected).max() < EXACT


def test_area_resize_is_exact_area_average() -> None:
    # 300 source pixels onto 128 output pixels: each source pixel repeated 32 times gives
    # 9600 = 128 x 75 sub-pixels, so the exact area average is a 75 x 75 block mean.
    rng = np.random.default_rng(0)
    crop = rng.random((300, 170), dtype=np.float32)
    square = np.zeros((300, 300), dtype=np.float64)
    square[:, :170] = crop
    rows = np.repeat(square, 32, axis=0).reshape(128, 75, 300).mean(axis=1)
    expected = np.repeat(rows, 32, axis=1).reshape(128, 128, 75).mean(axis=2)

    resized = breast.square_resize(crop, 128)

    assert np.abs(resized - expected).max() < EXACT


def test_wide_crop_padded_above_and_below() -> None:
    crop = np.ones((50, 100), dtype=np.float32)
    resized = breast.square_resize(crop, 100)
    assert np.all(resized[:25] == 0.0)
    assert np.all(resized[75:] == 0.0)
    assert np.allclose(resized[25:75], 1.0, atol=EXACT)


# --------------------------------------------------------------------------- polarity


def test_monochrome1_twin_matches_monochrome2(film: np.ndarray) -> None:
    reference = mammogram(film)
    stored = dicom_factory.to_bits(film, 12)
    inverted = dicom_factory.make_mammogram(4095 - stored, "L", "MLO", photometric="MONOCHROME1")
    inverted.WindowCenter = [4095 - first_window(reference)[0]]
    inverted.WindowWidth = reference.WindowWidth
    inverted.PresentationLUTShape = "INVERSE"

    expected = preprocess_dataset(reference)
    result = preprocess_dataset(inverted)

    assert np.abs(result.image - expected.image).max() < EXACT
    assert result.metadata.crop_box == expected.metadata.crop_box
    assert result.metadata.warnings == ()


def test_monochrome1_identity_inverted_once_with_warning(film: np.ndarray) -> None:
    reference = mammogram(film)
    stored = dicom_factory.to_bits(film, 12)
    inverted = dicom_factory.make_mammogram(4095 - stored, "L", "MLO", photometric="MONOCHROME1")
    inverted.WindowCenter = [4095 - first_window(reference)[0]]
    inverted.WindowWidth = reference.WindowWidth
    inverted.PresentationLUTShape = "IDENTITY"

    result = preprocess_dataset(inverted)

    assert np.abs(result.image - preprocess_dataset(reference).image).max() < EXACT
    assert any("IDENTITY contradicts MONOCHROME1" in warning for warning in result.metadata.warnings)


def test_monochrome2_inverse_scored_with_warning(film: np.ndarray) -> None:
    reference = mammogram(film)
    contradictory = mammogram(film)
    contradictory.PresentationLUTShape = "INVERSE"

    result = preprocess_dataset(contradictory)

    assert np.abs(result.image - preprocess_dataset(reference).image).max() < EXACT
    assert any("INVERSE contradicts MONOCHROME2" in warning for warning in result.metadata.warnings)


# --------------------------------------------------------------------------- VOI


def ramp_dataset(function: str | None, center: float | None, width: float | None) -> Dataset:
    """A 64 x 64 ramp over all 4096 12-bit values, without padding."""
    ds = dicom_factory.make_mammogram(np.arange(4096, dtype=np.uint16).reshape(64, 64), "L", "CC")
    del ds.PixelPaddingValue
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"):
        if keyword in ds:
            delattr(ds, keyword)
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    if function is not None:
        ds.VOILUTFunction = function
    return ds


def test_sigmoid_follows_standard_formula() -> None:
    center, width = 1800.0, 900.0
    ds = ramp_dataset("SIGMOID", center, width)
    x = np.arange(4096, dtype=np.float64).reshape(64, 64)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))

    result = dicom_pixels.display_pixels(ds)

    assert result.voi_source == "window"
    assert np.abs(result.image - expected).max() < EXACT


def test_linear_follows_standard_formula() -> None:
    center, width = 2000.0, 1001.0
    ds = ramp_dataset("LINEAR", center, width)
    x = np.arange(4096, dtype=np.float64).reshape(64, 64)
    expected = (x - (center - 0.5)) / (width - 1) + 0.5
    expected[x <= center - 0.5 - (width - 1) / 2] = 0.0
    expected[x > center - 0.5 + (width - 1) / 2] = 1.0

    result = dicom_pixels.display_pixels(ds)

    assert np.abs(result.image - expected).max() < EXACT
    assert result.image[x == 1499.0].item() == 0.0  # c - 0.5 - (w - 1) / 2 maps to the minimum
    assert result.image[x == 2500.0].item() == 1.0


@pytest.mark.parametrize(("function", "center", "width"), [("LINEAR", 2000.0, 1001.0), ("SIGMOID", 1800.0, 900.0)])
def test_window_matches_pydicom(function: str, center: float, width: float) -> None:
    ds = ramp_dataset(function, center, width)
    x = np.arange(4096, dtype=np.float64).reshape(64, 64)
    expected = apply_windowing(x, ds) / 4095.0  # pydicom's output range is the 12-bit range

    assert np.abs(dicom_pixels.display_pixels(ds).image - expected).max() < EXACT


def test_invalid_voi_lut_sequence_falls_back_to_window() -> None:
    ds = ramp_dataset("SIGMOID", 1500.0, 600.0)
    reference = dicom_pixels.display_pixels(ds).image
    item = Dataset()
    item.LUTDescriptor = [100, 0, 12]
    item.add_new("LUTData", "US", [0] * 50)
    ds.VOILUTSequence = Sequence([item])

    result = dicom_pixels.display_pixels(ds)

    assert result.voi_source == "window"
    assert np.array_equal(result.image, reference)
    assert any("invalid VOI LUT Sequence" in warning for warning in result.warnings)


def test_linear_is_the_default_function() -> None:
    explicit = dicom_pixels.display_pixels(ramp_dataset("LINEAR", 1000.0, 500.0)).image
    default = dicom_pixels.display_pixels(ramp_dataset(None, 1000.0, 500.0)).image
    assert np.array_equal(explicit, default)


def test_linear_width_one_is_a_threshold() -> None:
    result = dicom_pixels.display_pixels(ramp_dataset("LINEAR", 100.0, 1.0)).image.ravel()
    assert np.all(result[:100] == 0.0)
    assert np.all(result[100:] == 1.0)


def test_linear_exact_follows_standard_formula() -> None:
    center, width = 2047.5, 4095.0
    ds = ramp_dataset("LINEAR_EXACT", center, width)
    x = np.arange(4096, dtype=np.float64).reshape(64, 64)
    expected = np.clip((x - center) / width + 0.5, 0.0, 1.0)

    result = dicom_pixels.display_pixels(ds)

    assert np.abs(result.image - expected).max() < EXACT
    assert result.image.ravel()[0] == 0.0
    assert result.image.ravel()[-1] == 1.0


def test_several_windows_use_the_first() -> None:
    first_only = dicom_pixels.display_pixels(ramp_dataset("SIGMOID", 1500.0, 600.0)).image
    several = ramp_dataset("SIGMOID", 1500.0, 600.0)
    several.WindowCenter = [1500, 2500, 3000]
    several.WindowWidth = [600, 300, 100]
    assert np.array_equal(dicom_pixels.display_pixels(reread(several)).image, first_only)


@pytest.mark.parametrize("width", [0.0, -5.0])
def test_invalid_window_width_raises(width: float) -> None:
    ds = ramp_dataset("SIGMOID", 1500.0, width)
    with pytest.raises(dicom_pixels.PixelDataError, match="Window Width"):
        dicom_pixels.display_pixels(ds)


def test_unknown_voi_lut_function_raises() -> None:
    ds = ramp_dataset("LOG", 1500.0, 600.0)
    with pytest.raises(dicom_pixels.PixelDataError, match="LOG"):
        dicom_pixels.display_pixels(ds)


def voi_lut_item(lut: np.ndarray, first_mapped: int, bits: int, as_bytes: bool) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut) % 65536, first_mapped, bits]
    if as_bytes:
        item.add_new("LUTData", "OW", np.asarray(lut, dtype="<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(value) for value in lut])
    item.LUTExplanation = "test"
    return item


@pytest.mark.parametrize(("bits", "as_bytes"), [(8, False), (8, True), (16, False), (16, True)])
def test_voi_lut_sequence(bits: int, as_bytes: bool) -> None:
    top = (1 << bits) - 1
    first_mapped, entries = 1000, 2000
    lut = np.round(np.linspace(0, 1, entries) ** 0.5 * top).astype(np.int64)
    ds = ramp_dataset("SIGMOID", 1500.0, 600.0)  # the sequence wins over the window
    ds.VOILUTSequence = Sequence([voi_lut_item(lut, first_mapped, bits, as_bytes)])
    x = np.arange(4096).reshape(64, 64)
    expected = lut[np.clip(x - first_mapped, 0, entries - 1)] / top

    result = dicom_pixels.display_pixels(reread(ds))

    assert result.voi_source == "VOI LUT Sequence"
    assert np.abs(result.image - expected).max() < EXACT


def test_voi_lut_8_bit_packed_bytes() -> None:
    lut = np.arange(256, dtype=np.uint8)[::-1]
    ds = ramp_dataset(None, None, None)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new("LUTData", "OW", lut.tobytes())
    ds.VOILUTSequence = Sequence([item])
    x = np.arange(4096).reshape(64, 64)
    expected = lut[np.clip(x, 0, 255)] / 255.0

    result = dicom_pixels.display_pixels(ds)

    assert np.abs(result.image - expected).max() < EXACT


def test_modality_lut_sequence() -> None:
    ds = ramp_dataset("LINEAR_EXACT", 1000.0, 2000.0)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", [value // 2 for value in range(4096)])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    del ds.RescaleSlope
    del ds.RescaleIntercept
    x = np.arange(4096).reshape(64, 64) // 2
    expected = np.clip((x - 1000.0) / 2000.0 + 0.5, 0.0, 1.0)

    result = dicom_pixels.display_pixels(reread(ds))

    assert np.abs(result.image - expected).max() < EXACT


def test_no_window_falls_back_to_percentiles(film: np.ndarray) -> None:
    ds = mammogram(film)
    del ds.WindowCenter
    del ds.WindowWidth
    del ds.VOILUTFunction
    stored = dicom_factory.to_bits(film, 12).astype(np.float64)
    tissue = stored[stored != 0]
    low, high = np.percentile(tissue, dicom_pixels.FALLBACK_PERCENTILES)
    expected = np.clip((stored - low) / (high - low), 0.0, 1.0)
    expected[stored == 0] = 0.0

    pixels = dicom_pixels.display_pixels(ds)
    view = preprocess_dataset(ds)

    assert pixels.voi_source == "fallback"
    assert np.abs(pixels.image - expected).max() < EXACT
    assert any("percentile" in warning for warning in view.metadata.warnings)
    assert view.metadata.voi_source == "fallback"


# --------------------------------------------------------------------------- padding


def test_padding_border_does_not_move_crop(film: np.ndarray) -> None:
    reference = preprocess_dataset(mammogram(film))
    top, left, bottom, right = 37, 11, 23, 5
    padded = np.pad(film, ((top, bottom), (left, right)), constant_values=0)

    result = preprocess_dataset(mammogram(padded))

    row0, col0, row1, col1 = result.metadata.crop_box
    assert (row0 - top, col0 - left, row1 - top, col1 - left) == reference.metadata.crop_box
    assert np.abs(result.image - reference.image).max() < EXACT


def test_bright_padding_is_background(film: np.ndarray) -> None:
    stored = dicom_factory.to_bits(film, 12)
    reference = mammogram(film)
    reference.PixelPaddingValue = 4095  # no stored value is 4095, so nothing is padding
    bright = copy.deepcopy(reference)
    set_pixels(bright, np.pad(stored, 20, constant_values=4095))

    pixels = dicom_pixels.display_pixels(bright)
    result = preprocess_dataset(bright)

    assert np.all(pixels.image[:20] == 0.0)
    assert np.all(pixels.image[:, -20:] == 0.0)
    row0, col0, row1, col1 = result.metadata.crop_box
    assert (row0 - 20, col0 - 20, row1 - 20, col1 - 20) == preprocess_dataset(reference).metadata.crop_box


def test_padding_range_limit(film: np.ndarray) -> None:
    stored = dicom_factory.to_bits(film, 12)
    ds = mammogram(film)
    noisy = np.pad(stored, 30, constant_values=0)
    rng = np.random.default_rng(1)
    border = np.ones(noisy.shape, dtype=bool)
    border[30:-30, 30:-30] = False
    noisy[border] = rng.integers(0, 8, size=int(border.sum()))
    set_pixels(ds, noisy)
    ds.PixelPaddingRangeLimit = 7

    pixels = dicom_pixels.display_pixels(ds)
    result = preprocess_dataset(ds)

    assert np.all(pixels.image[border] == 0.0)
    row0, col0, row1, col1 = result.metadata.crop_box
    assert (row0 - 30, col0 - 30, row1 - 30, col1 - 30) == preprocess_dataset(mammogram(film)).metadata.crop_box


# --------------------------------------------------------------------------- bit depth


@pytest.mark.parametrize("bits", [10, 14, 16])
def test_bits_stored_twins_match(film: np.ndarray, bits: int) -> None:
    twin = preprocess_dataset(mammogram(film, bits_stored=12))
    result = preprocess_dataset(reread(mammogram(film, bits_stored=bits)))

    assert np.abs(result.image - twin.image).max() < BIT_DEPTH_TOLERANCE
    assert result.metadata.crop_box == twin.metadata.crop_box


def test_signed_pixels_match_twin(film: np.ndarray) -> None:
    reference = mammogram(film)
    stored = dicom_factory.to_bits(film, 12).astype(np.int16) - 2048
    ds = mammogram(film)
    ds.PixelRepresentation = 1
    set_pixels(ds, stored)
    del ds.PixelPaddingValue
    ds.add_new("PixelPaddingValue", "SS", -2048)
    ds.WindowCenter = [first_window(reference)[0] - 2048]

    result = preprocess_dataset(reread(ds))

    assert np.abs(result.image - preprocess_dataset(reference).image).max() < EXACT


def test_signed_pixels_with_intercept_match_twin(film: np.ndarray) -> None:
    reference = mammogram(film)
    ds = mammogram(film)
    ds.PixelRepresentation = 1
    set_pixels(ds, dicom_factory.to_bits(film, 12).astype(np.int16) - 2048)
    del ds.PixelPaddingValue
    ds.add_new("PixelPaddingValue", "SS", -2048)
    ds.RescaleIntercept = 2048

    result = preprocess_dataset(reread(ds))

    assert np.abs(result.image - preprocess_dataset(reference).image).max() < EXACT


def test_rescale_slope_intercept_match_twin(film: np.ndarray) -> None:
    reference = mammogram(film)
    ds = mammogram(film)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1000
    ds.WindowCenter = [2 * first_window(reference)[0] - 1000]
    ds.WindowWidth = [2 * first_window(reference)[1]]

    result = preprocess_dataset(reread(ds))

    assert np.abs(result.image - preprocess_dataset(reference).image).max() < EXACT


def test_rle_compressed_matches_native(film: np.ndarray) -> None:
    native = mammogram(film)
    compressed = copy.deepcopy(native)
    compressed.compress(RLELossless)

    result = preprocess_dataset(reread(compressed))

    assert np.array_equal(result.image, preprocess_dataset(native).image)


# --------------------------------------------------------------------------- broken pixel data


def test_truncated_pixel_data_raises(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.PixelData = ds.PixelData[:-1000]
    with pytest.raises(PreprocessingError, match="truncated pixel data"):
        preprocess_dataset(ds)


def test_missing_pixel_data_raises(film: np.ndarray) -> None:
    ds = mammogram(film)
    del ds.PixelData
    with pytest.raises(PreprocessingError, match="missing Pixel Data"):
        preprocess_dataset(ds)


def test_rows_larger_than_data_raises(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.Rows = 300
    with pytest.raises(PreprocessingError, match="Rows 300 x Columns 256"):
        preprocess_dataset(ds)


def test_rows_smaller_than_data_raises(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.Rows = 200
    with pytest.raises(PreprocessingError, match="Rows/Columns disagree"):
        preprocess_dataset(ds)


def test_corrupt_compressed_data_raises(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.compress(RLELossless)
    ds = reread(ds)
    fragment_start = len(ds.PixelData) // 2
    ds.PixelData = ds.PixelData[:fragment_start] + b"\x00" * (len(ds.PixelData) - fragment_start)
    with pytest.raises(PreprocessingError, match="failed to decode Pixel Data"):
        preprocess_dataset(ds)


def without_file_meta(ds: Dataset, implicit_vr: bool) -> Dataset:
    """Encode ``ds`` without preamble and file meta and read it back with force=True."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    write_dataset(buffer, ds)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)


@pytest.mark.parametrize("implicit_vr", [False, True])
def test_dataset_without_file_meta_matches_twin(film: np.ndarray, implicit_vr: bool) -> None:
    ds = mammogram(film)
    stripped = without_file_meta(ds, implicit_vr)
    assert "TransferSyntaxUID" not in stripped.file_meta

    result = preprocess_dataset(stripped)

    assert np.array_equal(result.image, preprocess_dataset(ds).image)


def test_encapsulated_without_transfer_syntax_raises(film: np.ndarray) -> None:
    ds = reread(mammogram(film))
    ds.compress(RLELossless)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PreprocessingError, match="missing Transfer Syntax UID"):
        preprocess_dataset(ds)


# --------------------------------------------------------------------------- header checks


def test_for_processing_sop_class_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film, header=dicom_factory.GE_FOR_PROCESSING)
    with pytest.raises(UnsupportedView, match=r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.1\.2\.1"):
        check_scorable(ds)


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.3.1"])
def test_other_for_processing_classes_unsupported(film: np.ndarray, uid: str) -> None:
    ds = mammogram(film)
    ds.SOPClassUID = uid
    with pytest.raises(UnsupportedView, match="For Processing"):
        check_scorable(ds)


def test_for_processing_intent_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(UnsupportedView, match="FOR PROCESSING"):
        check_scorable(ds)


def test_real_ge_files_unsupported(data_dir: Path) -> None:
    folder = data_dir / "dicom-mg"
    with pytest.raises(UnsupportedView, match="1 x 2 pixels"):
        check_scorable(pydicom.dcmread(folder / "MG-Im-GE_Seno_1_ForPresentation.dcm"))
    with pytest.raises(UnsupportedView, match="For Processing"):
        check_scorable(pydicom.dcmread(folder / "MG-Im-GE-SenDS-scaled.dcm"))


def test_check_scorable_reads_no_pixel_data(data_dir: Path) -> None:
    path = data_dir / "dicom-mg" / "MG-Im-GE_Seno_2_ForPresentation.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(UnsupportedView, match="too small|pixels"):
        check_scorable(ds)


@pytest.mark.parametrize("value", ["ML", "LM", "XCCL", "XCCM", "FB", "SIO"])
def test_other_view_positions_unsupported(film: np.ndarray, value: str) -> None:
    ds = mammogram(film)
    ds.ViewPosition = value
    with pytest.raises(UnsupportedView, match=f"View Position is {value}"):
        check_scorable(ds)


@pytest.mark.parametrize(
    ("code", "scheme", "meaning"),
    [
        ("R-10224", "SRT", "medio-lateral"),
        ("399260004", "SCT", "medio-lateral"),
        ("R-10228", "SRT", "latero-medial"),
        ("399099002", "SCT", "cranio-caudal exaggerated laterally"),
    ],
)
def test_other_view_codes_unsupported(film: np.ndarray, code: str, scheme: str, meaning: str) -> None:
    ds = mammogram(film)
    ds.ViewPosition = ""
    ds.ViewCodeSequence = Sequence([code_item(code, scheme, meaning)])
    with pytest.raises(UnsupportedView, match=code):
        check_scorable(ds)


@pytest.mark.parametrize(
    ("code", "scheme", "view"),
    [("R-10242", "SRT", "CC"), ("399162004", "SCT", "CC"), ("R-10226", "SNM3", "MLO"), ("399368009", "SCT", "MLO")],
)
def test_view_code_without_view_position(film: np.ndarray, code: str, scheme: str, view: str) -> None:
    ds = mammogram(film)
    del ds.ViewPosition
    ds.ViewCodeSequence = Sequence([code_item(code, scheme, view)])
    check_scorable(ds)
    assert preprocess_dataset(ds).metadata.view_position == view


@pytest.mark.parametrize(
    ("code", "meaning"), [("R-102D2", "spot compression"), ("R-102D6", "magnification")]
)
def test_view_modifiers_unsupported(film: np.ndarray, code: str, meaning: str) -> None:
    ds = mammogram(film)
    view = code_item("R-10226", "SRT", "medio-lateral oblique")
    view.ViewModifierCodeSequence = Sequence([code_item(code, "SRT", meaning)])
    ds.ViewCodeSequence = Sequence([view])
    with pytest.raises(UnsupportedView, match=meaning):
        check_scorable(ds)


def test_view_position_contradicting_code_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film, view="CC")
    ds.ViewCodeSequence = Sequence([code_item("399368009", "SCT", "medio-lateral oblique")])
    with pytest.raises(UnsupportedView, match="contradicts"):
        check_scorable(ds)


def test_multi_frame_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.NumberOfFrames = 3
    with pytest.raises(UnsupportedView, match="Number of Frames is 3"):
        check_scorable(ds)


def test_tomosynthesis_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    with pytest.raises(UnsupportedView, match="Tomosynthesis"):
        check_scorable(ds)


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"])
def test_non_breast_classes_unsupported(film: np.ndarray, uid: str) -> None:
    ds = mammogram(film)
    ds.SOPClassUID = uid
    with pytest.raises(UnsupportedView, match="not a mammogram"):
        check_scorable(ds)


def test_digital_xray_needs_breast(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    with pytest.raises(UnsupportedView, match="not a breast image"):
        check_scorable(ds)
    ds.BodyPartExamined = "BREAST"
    check_scorable(ds)


@pytest.mark.parametrize(("keyword", "value"), [("SamplesPerPixel", 3), ("PhotometricInterpretation", "RGB")])
def test_colour_unsupported(film: np.ndarray, keyword: str, value: object) -> None:
    ds = mammogram(film)
    setattr(ds, keyword, value)
    with pytest.raises(UnsupportedView, match=str(value)):
        check_scorable(ds)


def test_small_image_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film[:60, :200])
    with pytest.raises(UnsupportedView, match="60 x 200"):
        check_scorable(ds)


def test_missing_laterality_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film)
    del ds.ImageLaterality
    with pytest.raises(UnsupportedView, match="Laterality"):
        check_scorable(ds)


def test_series_laterality_used(film: np.ndarray) -> None:
    ds = mammogram(film)
    del ds.ImageLaterality
    ds.Laterality = "L"
    assert preprocess_dataset(ds).metadata.laterality == "L"


def test_contradictory_laterality_unsupported(film: np.ndarray) -> None:
    ds = mammogram(film)
    ds.Laterality = "R"
    with pytest.raises(UnsupportedView, match="contradictory laterality"):
        check_scorable(ds)


@pytest.mark.parametrize("value", ["B", "U"])
def test_bilateral_unsupported(film: np.ndarray, value: str) -> None:
    ds = mammogram(film)
    ds.ImageLaterality = value
    with pytest.raises(UnsupportedView, match=f"is {value}"):
        check_scorable(ds)


def test_frame_laterality_in_functional_groups(film: np.ndarray) -> None:
    ds = mammogram(film)
    del ds.ImageLaterality
    anatomy = Dataset()
    anatomy.FrameLaterality = "L"
    group = Dataset()
    group.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.4"
    check_scorable(ds)
    assert preprocess_dataset(ds).metadata.laterality == "L"


# --------------------------------------------------------------------------- orientation


def test_right_twin_mirrored_matches_left(film: np.ndarray) -> None:
    left = preprocess_dataset(mammogram(film, "L"))
    right = preprocess_dataset(mammogram(film[:, ::-1].copy(), "R"))

    assert right.metadata.flipped is True
    assert left.metadata.flipped is False
    assert np.abs(right.image - left.image).max() < EXACT
    row0, col0, row1, col1 = left.metadata.crop_box
    assert right.metadata.crop_box == (row0, 256 - col1, row1, 256 - col0)


def test_chest_wall_ends_on_the_left(data_dir: Path) -> None:
    for number in (LEFT_FILM, RIGHT_FILM):
        view = preprocess_dataset(mammogram(dicom_factory.load_mias(number)[::4, ::4], dicom_factory.mias_laterality(number)))
        image = view.image
        assert image[:, :16].mean() > image[:, -16:].mean(), f"mdb{number:03d}"


def test_rotated_storage_turned_back(film: np.ndarray) -> None:
    reference = preprocess_dataset(mammogram(film, view="CC"))
    ds = mammogram(np.rot90(film, -1).copy(), view="CC")
    ds.PatientOrientation = ["L", "A"]  # rows run to the patient's left, columns anterior

    result = preprocess_dataset(ds)

    assert result.metadata.chest_wall == "top"
    assert np.abs(result.image - reference.image).max() < EXACT
    assert any("at the top" in warning for warning in result.metadata.warnings)


def test_lateral_down_cc_is_mirrored_vertically(film: np.ndarray) -> None:
    reference = preprocess_dataset(mammogram(film, view="CC"))
    ds = mammogram(film[::-1].copy(), view="CC")
    ds.PatientOrientation = ["A", "L"]

    result = preprocess_dataset(ds)

    assert result.metadata.flipped_vertical is True
    assert np.abs(result.image - reference.image).max() < EXACT


def test_missing_patient_orientation_uses_laterality(film: np.ndarray) -> None:
    reference = preprocess_dataset(mammogram(film[:, ::-1].copy(), "R"))
    ds = mammogram(film[:, ::-1].copy(), "R")
    del ds.PatientOrientation

    result = preprocess_dataset(ds)

    assert result.metadata.flipped is True
    assert np.array_equal(result.image, reference.image)
    assert any("Patient Orientation is missing" in warning for warning in result.metadata.warnings)


def test_orientation_contradicting_content_warns(film: np.ndarray) -> None:
    ds = mammogram(film, "R")  # a left film labelled right: header says chest wall on the right
    result = preprocess_dataset(ds)
    assert any("image content suggests the left" in warning for warning in result.metadata.warnings)
    assert result.metadata.flipped is True


def test_unknown_laterality_detected_from_content(data_dir: Path) -> None:
    for number in (LEFT_FILM, RIGHT_FILM):
        known = preprocess_file(dicom_factory.mias_path(number), laterality=dicom_factory.mias_laterality(number))
        unknown = preprocess_file(dicom_factory.mias_path(number))
        assert unknown.metadata.laterality is None
        assert unknown.metadata.flipped == known.metadata.flipped
        assert np.array_equal(unknown.image, known.image)
        assert any("detected on the" in warning for warning in unknown.metadata.warnings)


# --------------------------------------------------------------------------- breast detection


def test_film_label_does_not_move_crop(data_dir: Path) -> None:
    pixels = dicom_factory.load_mias(LEFT_FILM)
    reference = preprocess_dataset(mammogram(pixels))
    row0, col0, row1, col1 = reference.metadata.crop_box
    labelled = pixels.copy()
    labelled[40:110, col1 + 60 : col1 + 200] = 255  # bright label beyond the nipple side, top
    labelled[900:960, col1 + 40 : col1 + 120] = 230

    result = preprocess_dataset(mammogram(labelled))

    assert result.metadata.crop_box == reference.metadata.crop_box


def lesion_centres(data_dir: Path) -> dict[int, tuple[int, int]]:
    """Abnormality centres (row from the top, column) per film from Info.txt."""
    centres = {}
    for line in (data_dir / "mini-mias" / "Info.txt").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0].startswith("mdb") and fields[4].isdigit():
            number = int(fields[0][3:])
            centres.setdefault(number, (1024 - int(fields[5]), int(fields[4])))
    return centres


def test_crop_contains_tenth_lesion_centres(data_dir: Path) -> None:
    centres = lesion_centres(data_dir)
    assert len(centres) > 100
    for number in sorted(centres)[::10]:
        row, column = centres[number]
        view = preprocess_file(dicom_factory.mias_path(number), laterality=dicom_factory.mias_laterality(number))
        row0, col0, row1, col1 = view.metadata.crop_box
        assert row0 <= row < row1, f"mdb{number:03d}: lesion row {row} outside {view.metadata.crop_box}"
        assert col0 <= column < col1, f"mdb{number:03d}: lesion column {column} outside {view.metadata.crop_box}"


# --------------------------------------------------------------------------- files and one path


@pytest.mark.parametrize("number", [LEFT_FILM, RIGHT_FILM])
def test_file_equals_dicom_of_same_pixels(data_dir: Path, number: int) -> None:
    laterality = dicom_factory.mias_laterality(number)
    from_file = preprocess_file(dicom_factory.mias_path(number), laterality=laterality, view_position="MLO")
    ds = mammogram(dicom_factory.load_mias(number), laterality)
    ds.VOILUTFunction = "LINEAR_EXACT"
    ds.WindowCenter = [4095 / 2]
    ds.WindowWidth = [4095]

    from_dicom = preprocess_dataset(reread(ds))

    assert np.abs(from_file.image - from_dicom.image).max() < ONE_PATH_TOLERANCE
    assert from_file.metadata.crop_box == from_dicom.metadata.crop_box
    assert from_file.metadata.flipped == from_dicom.metadata.flipped


def test_png_8_and_16_bit_match_pgm(data_dir: Path, tmp_path: Path) -> None:
    pixels = dicom_factory.load_mias(LEFT_FILM)
    reference = preprocess_file(dicom_factory.mias_path(LEFT_FILM), laterality="L")
    Image.fromarray(pixels).save(tmp_path / "film8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "film16.png")
    (tmp_path / "film.pgm").write_bytes(gzip.decompress(dicom_factory.mias_path(LEFT_FILM).read_bytes()))

    for name in ("film8.png", "film16.png", "film.pgm"):
        result = preprocess_file(tmp_path / name, laterality="L")
        assert np.abs(result.image - reference.image).max() < EXACT, name


def test_unreadable_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.pgm.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(PreprocessingError, match="broken.pgm.gz"):
        preprocess_file(path)


def test_colour_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "colour.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(PreprocessingError, match="mode RGB"):
        preprocess_file(path)


@pytest.mark.parametrize(("laterality", "view"), [("X", None), (None, "ML")])
def test_file_arguments_checked(data_dir: Path, laterality: str | None, view: str | None) -> None:
    with pytest.raises(ValueError, match="expected"):
        preprocess_file(dicom_factory.mias_path(LEFT_FILM), laterality=laterality, view_position=view)


def test_shared_function_used_by_both_paths(film: np.ndarray) -> None:
    pixels = dicom_pixels.display_pixels(mammogram(film))
    direct = preprocess_array(
        pixels.image, pixels.padding, laterality="L", view_position="MLO", orientation=breast.Orientation("left")
    )
    assert np.array_equal(direct.image, preprocess_dataset(mammogram(film)).image)


# --------------------------------------------------------------------------- full field


@pytest.mark.parametrize("voi", ["SIGMOID", "LINEAR", "VOI LUT Sequence"])
def test_full_field_image_memory(data_dir: Path, voi: str) -> None:
    """A 4096 x 5625 16-bit view is processed without a full-size float64 or int64 copy."""
    film = np.asarray(Image.fromarray(dicom_factory.load_mias(LEFT_FILM)).resize((4096, 5625), Image.Resampling.BILINEAR))
    ds = mammogram(film, bits_stored=16)
    if voi == "LINEAR":
        ds.VOILUTFunction = "LINEAR"
    if voi == "VOI LUT Sequence":
        lut = np.round(np.linspace(0, 1, 1 << 16) ** 0.7 * 4095).astype(np.int64)
        ds.VOILUTSequence = Sequence([voi_lut_item(lut, 0, 12, as_bytes=True)])
    # The float32 display image, the uint16 stored values and the bool padding mask take
    # 7 bytes a pixel. A float64 copy of the image would add 8 more.
    allowed = 4096 * 5625 * 7.5

    tracemalloc.start()
    try:
        view = preprocess_dataset(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert view.image.shape == (OUTPUT_SIZE, OUTPUT_SIZE)
    assert view.metadata.voi_source == ("window" if voi in ("SIGMOID", "LINEAR") else voi)
    assert peak < allowed, f"peak {peak / 2**20:.0f} MiB"

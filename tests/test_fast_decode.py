"""Reduced-resolution decoding against the full decode, on real mini-MIAS pixels.

The worker decodes large views at a reduced resolution (``reduced_decoding``), while the
training cache decodes them in full. The tolerances below bound how far the two paths
may differ; docs/benchmarks.md lists the differences measured on the full-field test study.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

import dicom_factory
from model import dicom_pixels
from model.checkpoint import default_checkpoint_path
from model.dicom_pixels import (
    MIN_REDUCED_SIDE,
    ReducedDecoding,
    area_average,
    decode_stored_values,
    jpeg2000_level,
    read_jpeg2000_header,
    reduced_decoding,
    single_frame,
)
from model.preprocess import OUTPUT_SIZE, preprocess_dataset
from model.scoring import Scorer
from worker import pipeline

# Full-field geometry of the test study: mini-MIAS films scaled up four times.
FULL_FIELD_SHAPE = (4096, 3328)
# Tolerances between the reduced and the full decode of one full-field view, on the
# 128 x 128 model input in [0, 1] and on the z-score (units of the calibration's
# healthy standard deviation).
MEAN_ABSOLUTE_TOLERANCE = 0.01
P99_ABSOLUTE_TOLERANCE = 0.12
Z_SCORE_TOLERANCE = 0.15


def full_field_pixels(film: int, laterality: str) -> np.ndarray:
    """Film ``mdbNNN`` cut to 832 columns at its chest-wall side, scaled up 4x, 12 bits, with seeded noise."""
    film8 = dicom_factory.load_mias(film)
    kept = film8[:, :832] if laterality == "L" else film8[:, -832:]
    scaled = Image.fromarray(kept.astype(np.float32), mode="F").resize(FULL_FIELD_SHAPE[::-1], Image.Resampling.BILINEAR)
    values = np.asarray(scaled, dtype=np.float32) * np.float32(4095 / 255)
    tissue = values > 0
    values[tissue] += np.random.default_rng(film).normal(0.0, 16.0, int(tissue.sum())).astype(np.float32)
    values = np.clip(values, 0, 4095)
    values[tissue] = np.maximum(values[tissue], 1)
    return np.rint(values).astype(np.uint16)


def jpeg2000_dataset(pixels: np.ndarray, codestream: bytes | None = None, bits_stored: int = 12) -> pydicom.Dataset:
    """A left MLO view whose Pixel Data is ``codestream``, or ``pixels`` encoded by pydicom when None."""
    ds = dicom_factory.make_mammogram(pixels, "L", "MLO", study_key="fast-decode", bits_stored=bits_stored)
    if codestream is None:
        ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        return ds
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def pillow_codestream(pixels: np.ndarray, **options: object) -> bytes:
    """Encode 16-bit ``pixels`` as a lossless JPEG 2000 codestream with Pillow's encoder options."""
    picture = Image.frombuffer("I;16", pixels.shape[::-1], np.ascontiguousarray(pixels, dtype="<u2").tobytes(), "raw", "I;16", 0, 1)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG2000", no_jp2=True, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def full_field_views(data_dir: Path) -> dict[str, bytes]:
    """A JPEG 2000 and an uncompressed full-field view, as Part 10 bytes."""
    views = {}
    jpeg2000 = jpeg2000_dataset(full_field_pixels(4, "L"))
    native = dicom_factory.make_mammogram(full_field_pixels(8, "L"), "L", "CC", study_key="fast-decode", bits_stored=12)
    for name, ds in (("jpeg2000", jpeg2000), ("uncompressed", native)):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        views[name] = buffer.getvalue()
    return views


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint: Path) -> Scorer:
    """The shipped checkpoint when it exists, else the untrained tiny one."""
    path = default_checkpoint_path()
    return Scorer(path if path.is_file() else tiny_checkpoint, backend="torch")


def read(view: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(view))


@pytest.mark.parametrize(
    ("encoding", "method"),
    [("jpeg2000", "JPEG 2000 resolution level 3"), ("uncompressed", "averaging 8 x 8 blocks")],
)
def test_reduced_view_matches_full(
    full_field_views: dict[str, bytes], scorer: Scorer, encoding: str, method: str
) -> None:
    full = preprocess_dataset(read(full_field_views[encoding]))
    with reduced_decoding() as decoding:
        reduced = preprocess_dataset(read(full_field_views[encoding]))

    assert decoding.factor == 8
    assert decoding.method == method
    assert decoding.decoded_shape == (512, 416)
    assert "1/8 resolution" in decoding.note()
    difference = np.abs(full.image - reduced.image)
    assert float(difference.mean()) <= MEAN_ABSOLUTE_TOLERANCE
    assert float(np.percentile(difference, 99)) <= P99_ABSOLUTE_TOLERANCE
    # The crop boxes are found on grids of different origin, so they may differ by up
    # to two decoded pixels.
    reduced_box = decoding.source_box(reduced.metadata.crop_box)
    assert max(abs(a - b) for a, b in zip(full.metadata.crop_box, reduced_box)) <= 2 * decoding.factor

    # The score is compared at the checkpoint's view size, with the reduced decode's
    # minimum side scaled to that size as the worker does.
    size = scorer.view_size
    full_view = preprocess_dataset(read(full_field_views[encoding]), size=size)
    with reduced_decoding(MIN_REDUCED_SIDE * size // OUTPUT_SIZE):
        reduced_view = preprocess_dataset(read(full_field_views[encoding]), size=size)
    full_score = scorer.score(full_view.image, "L", "MLO")
    reduced_score = scorer.score(reduced_view.image, "L", "MLO")
    if scorer.pairwise:
        # With the full decode as the other breast's view, z moves by (reduced - full) / std.
        full_z = scorer.judge_pair(full_score, full_score, "L", "MLO").z_score
        reduced_z = scorer.judge_pair(reduced_score, full_score, "L", "MLO").z_score
    else:
        full_z, reduced_z = full_score.z_score, reduced_score.z_score
    assert full_z is not None
    assert reduced_z is not None
    assert abs(reduced_z - full_z) <= Z_SCORE_TOLERANCE


def test_full_decode_outside_context(full_field_views: dict[str, bytes]) -> None:
    stored = decode_stored_values(read(full_field_views["uncompressed"]))
    assert stored.shape == FULL_FIELD_SHAPE


def test_reduced_jpeg2000_is_low_band(full_field_views: dict[str, bytes]) -> None:
    ds = read(full_field_views["jpeg2000"])
    full = decode_stored_values(ds).astype(np.float64)
    with reduced_decoding():
        reduced = decode_stored_values(ds).astype(np.float64)
    block_means = area_average(full, 8)
    # The 5/3 wavelet's low band is a smoothed, not a box-averaged, copy: close on
    # average, apart at edges.
    assert reduced.shape == block_means.shape
    assert float(np.median(np.abs(reduced - block_means))) < 8.0


def test_area_average_ragged_blocks() -> None:
    values = np.random.default_rng(3).integers(0, 1 << 16, (1037, 515), dtype=np.uint16)
    averaged = area_average(values, 8)
    assert averaged.shape == (130, 65)
    assert averaged.dtype == np.float32
    for row, column in ((0, 0), (64, 31), (129, 0), (0, 64), (129, 64)):
        block = values[row * 8 : row * 8 + 8, column * 8 : column * 8 + 8]
        assert averaged[row, column] == pytest.approx(block.mean(), rel=1e-6)


def test_area_average_masks_high_bits() -> None:
    values = np.random.default_rng(4).integers(0, 1 << 12, (64, 64), dtype=np.uint16)
    with_overlay = values | np.uint16(1 << 15)
    assert np.array_equal(area_average(with_overlay, 4, mask=0x0FFF), area_average(values, 4))


def test_native_high_bits_masked(data_dir: Path) -> None:
    pixels = dicom_factory.to_bits(np.kron(dicom_factory.load_mias(4), np.ones((2, 1), np.uint8)), 12)
    ds = dicom_factory.make_mammogram(pixels | np.uint16(1 << 14), "L", "MLO", bits_stored=12)
    with reduced_decoding() as decoding:
        reduced = decode_stored_values(ds)
    assert decoding.factor == 4
    assert float(reduced.max()) <= 4095.0


def test_jpeg2000_header_fields() -> None:
    pixels = np.random.default_rng(5).integers(0, 4096, (1100, 1030), dtype=np.uint16)
    header = read_jpeg2000_header(pillow_codestream(pixels))
    assert (header.rows, header.columns) == (1100, 1030)
    assert header.components == 1
    assert header.precision == 16
    assert header.signed is False
    assert header.decomposition_levels == 5


def test_jpeg2000_header_reads_tile_parts() -> None:
    pixels = np.random.default_rng(6).integers(0, 4096, (1100, 1030), dtype=np.uint16)
    codestream = pillow_codestream(pixels, num_resolutions=3, tile_size=(256, 256))
    assert codestream.count(b"\xff\x90") >= 20  # one SOT marker per tile at least
    assert read_jpeg2000_header(codestream).decomposition_levels == 2

    ds = jpeg2000_dataset(pixels, codestream, bits_stored=16)
    with reduced_decoding(min_side=256) as decoding:
        reduced = decode_stored_values(ds)
    assert decoding.method == "JPEG 2000 resolution level 2"
    assert reduced.shape == (275, 258)


def test_jpeg2000_header_rejects_jp2() -> None:
    with pytest.raises(dicom_pixels.PixelDataError, match="not a JPEG 2000 codestream"):
        read_jpeg2000_header(b"\x00\x00\x00\x0cjP  \r\n\x87\n")


def test_jpeg2000_without_levels_decodes_full() -> None:
    pixels = np.random.default_rng(7).integers(0, 1 << 16, (1100, 1030), dtype=np.uint16)
    ds = jpeg2000_dataset(pixels, pillow_codestream(pixels, num_resolutions=1), bits_stored=16)
    with reduced_decoding() as decoding:
        stored = decode_stored_values(ds)
    assert stored.shape == (1100, 1030)
    assert np.array_equal(stored, pixels)
    assert decoding.factor == 1
    assert "0 decomposition levels" in decoding.note()


def test_jpeg2000_level_skips_pillow_rounding() -> None:
    # Pillow 13 rounds 777 / 4 to 194 where OpenJPEG decodes 195 columns.
    assert jpeg2000_level(1000, 777, 100, 5) == 1
    assert jpeg2000_level(4096, 3328, 512, 5) == 3
    assert jpeg2000_level(4096, 3328, 512, 2) == 2


def test_odd_sized_jpeg2000_decodes() -> None:
    pixels = np.random.default_rng(8).integers(0, 4096, (1000, 1541), dtype=np.uint16)
    ds = jpeg2000_dataset(pixels)
    with reduced_decoding(min_side=128) as decoding:
        reduced = decode_stored_values(ds)
    assert reduced.shape == decoding.decoded_shape
    assert decoding.factor > 1


def test_other_syntax_decodes_full(data_dir: Path) -> None:
    pixels = dicom_factory.to_bits(np.kron(dicom_factory.load_mias(4), np.ones((2, 1), np.uint8)), 12)
    ds = dicom_factory.make_mammogram(pixels, "L", "MLO", bits_stored=12)
    ds.compress(RLELossless, pixels, generate_instance_uid=False)
    with reduced_decoding() as decoding:
        stored = decode_stored_values(ds)
    assert stored.shape == pixels.shape
    assert "no reduced decoder for RLE Lossless" in decoding.note()


def test_small_image_not_reduced(data_dir: Path) -> None:
    pixels = dicom_factory.to_bits(dicom_factory.load_mias(4)[:1000, :1000], 12)
    ds = dicom_factory.make_mammogram(pixels, "L", "MLO")
    with reduced_decoding() as decoding:
        stored = decode_stored_values(ds)
    assert stored.shape == (1000, 1000)
    assert decoding.note() is None


def test_context_is_reset() -> None:
    with reduced_decoding():
        assert dicom_pixels._REDUCED_DECODING.get() is not None
    assert dicom_pixels._REDUCED_DECODING.get() is None


def test_source_box_clipped() -> None:
    decoding = ReducedDecoding(factor=8, source_shape=(4095, 3327), decoded_shape=(512, 416))
    assert decoding.source_box((1, 2, 512, 416)) == (8, 16, 4095, 3327)


def test_single_frame_joins_fragments() -> None:
    codestream = bytes(range(256)) * 10
    encapsulated = encapsulate([codestream], fragments_per_frame=3)
    assert single_frame(encapsulated) == codestream


def test_worker_records_decode_path(full_field_views: dict[str, bytes]) -> None:
    timings: dict[str, float] = {}
    view = pipeline.preprocess_view(read(full_field_views["jpeg2000"]), timings, MIN_REDUCED_SIDE)
    notes = [warning for warning in view.metadata.warnings if warning.startswith("decoded at 1/8 resolution")]
    assert notes == ["decoded at 1/8 resolution by JPEG 2000 resolution level 3: 512 x 416 of 4096 x 3328 pixels"]
    assert view.metadata.source_shape == FULL_FIELD_SHAPE
    row0, col0, row1, col1 = view.metadata.crop_box
    assert row1 > 2048
    assert col1 <= FULL_FIELD_SHAPE[1]
    assert set(timings) == {"decode_ms", "preprocess_ms"}


def test_worker_full_decode_option(full_field_views: dict[str, bytes]) -> None:
    view = pipeline.preprocess_view(read(full_field_views["uncompressed"]), {}, None)
    assert not any(warning.startswith("decoded at") for warning in view.metadata.warnings)
    assert view.metadata.source_shape == FULL_FIELD_SHAPE

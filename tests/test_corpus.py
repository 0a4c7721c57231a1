"""The DICOM corpus (tests/corpus.py) through the preprocessing function, case by case.

Each case is read from its encoded file as the worker reads a spooled file, checked with
``check_scorable`` and preprocessed with ``preprocess_dataset``. A scored case is compared
with its reference: its twin's array, or a display image computed in tests/corpus.py from
the formulas of DICOM PS3.3 C.11 and passed through the shared crop and resize step. Two
seeds run, so two different films show that each rule holds for the kind of object, not for
one file.
"""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder

import corpus
from model import dicom_pixels
from model.checkpoint import load_checkpoint
from model.preprocess import OUTPUT_SIZE, PreprocessedView
from model.scoring import Scorer
from worker import pipeline, scp
from worker.db import Instance

SEEDS = (corpus.SEED, corpus.SEED + 1)
CASES = {seed: corpus.build_corpus(seed) for seed in SEEDS}
CASE_IDS = [(seed, name) for seed in SEEDS for name in CASES[seed]]


def case_id(value: tuple[int, str]) -> str:
    return f"seed{value[0]}-{value[1]}"


_references: dict[tuple[int, str], PreprocessedView] = {}


def cached_reference(seed: int, case: corpus.Case) -> PreprocessedView:
    key = (seed, case.twin if case.expected.reference == "twin" else case.name)
    if key not in _references:
        _references[key] = corpus.reference_view(case, CASES[seed])
    return _references[key]


def crop_shift(first: tuple[int, ...], second: tuple[int, ...]) -> int:
    return max(abs(a - b) for a, b in zip(first, second))


@pytest.mark.parametrize("key", CASE_IDS, ids=case_id)
def test_case_preprocessing_outcome(key: tuple[int, str]) -> None:
    seed, name = key
    case = CASES[seed][name]
    expected = case.expected
    status, reason, view = corpus.run_preprocessing(case)

    expected_status = expected.preprocess_status or expected.status
    expected_reason = expected.preprocess_reason if expected.preprocess_status else expected.reason
    assert status == expected_status, reason
    if status != "scored":
        if expected_reason:
            assert expected_reason in reason
        return

    assert view.image.shape == (OUTPUT_SIZE, OUTPUT_SIZE)
    assert view.image.dtype == np.float32
    assert float(view.image.max()) > 0.5, "the view is (nearly) black"
    if expected.warning:
        assert any(expected.warning in warning for warning in view.metadata.warnings), view.metadata.warnings
    if expected.reference is None:
        return

    reference = cached_reference(seed, case)
    difference = np.abs(view.image.astype(np.float64) - reference.image)
    if expected.max_difference is not None:
        assert float(difference.max()) <= expected.max_difference
    if expected.mean_difference is not None:
        assert float(difference.mean()) <= expected.mean_difference
    reference_box = reference.metadata.crop_box if case.laterality == "L" else corpus.mirrored_box(reference)
    assert crop_shift(view.metadata.crop_box, reference_box) <= expected.crop_shift
    assert view.metadata.laterality == case.laterality
    assert view.metadata.view_position == case.view_position
    if expected.reference == "twin" and expected.mean_difference is None:
        # Nothing but the expected warning is added to the twin's warnings.
        added = set(view.metadata.warnings) - set(reference.metadata.warnings)
        assert all(expected.warning and expected.warning in warning for warning in added), added


FORMULA_IDS = [key for key in CASE_IDS if CASES[key[0]][key[1]].expected.reference == "formula"]


@pytest.mark.parametrize("key", FORMULA_IDS, ids=case_id)
def test_display_follows_formula(key: tuple[int, str]) -> None:
    """At full resolution, before crop and resize, the display values equal the formula's."""
    case = CASES[key[0]][key[1]]
    pixels = dicom_pixels.display_pixels(case.dataset())
    assert np.abs(pixels.image - case.display).max() < corpus.EXACT


LOSSY_IDS = [key for key in CASE_IDS if CASES[key[0]][key[1]].expected.max_stored_error is not None]


@pytest.mark.parametrize("key", LOSSY_IDS, ids=case_id)
def test_lossy_stored_values_within_codec_error(key: tuple[int, str]) -> None:
    case = CASES[key[0]][key[1]]
    ds = case.dataset()
    assert ds.file_meta.TransferSyntaxUID == case.transfer_syntax_uid
    decoded, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds)
    error = np.abs(decoded.astype(np.float64) - case.source_stored)
    assert float(error.max()) <= case.expected.max_stored_error
    assert float(error.max()) > 0, "a lossy case decoded to its source exactly; it tests no loss"


def test_every_accepted_transfer_syntax_has_case() -> None:
    covered = {case.transfer_syntax_uid for case in CASES[corpus.SEED].values() if case.expected.stored}
    missing = [uid.name for uid in scp.decodable_transfer_syntaxes() if uid not in covered]
    assert not missing


def test_every_accepted_sop_class_has_case() -> None:
    covered = {case.sop_class_uid for case in CASES[corpus.SEED].values() if case.expected.stored}
    missing = [uid.name for uid in scp.STORAGE_SOP_CLASSES if uid not in covered]
    assert not missing


def test_variants_differ_from_twin() -> None:
    """Each case compared with a twin is another file with another SOP Instance UID."""
    cases = CASES[corpus.SEED]
    for name, case in cases.items():
        if case.twin is None:
            continue
        assert case.file_bytes != cases[case.twin].file_bytes, name
        assert case.sop_instance_uid != cases[case.twin].sop_instance_uid, name


def test_corpus_is_deterministic() -> None:
    """A second build of the same seed, DCMTK conversions included, gives the same bytes."""
    rebuilt = corpus.CorpusBuilder(corpus.SEED).build()
    assert list(rebuilt) == list(CASES[corpus.SEED])
    for name, case in rebuilt.items():
        assert case.file_bytes == CASES[corpus.SEED][name].file_bytes, name


def test_seeds_choose_other_films() -> None:
    films = {corpus.CorpusBuilder(seed).film_number for seed in range(6)}
    assert len(films) > 1
    assert all(number % 2 == 0 for number in films)


# --------------------------------------------------------------------------- objects never decoded


def spooled_instance(case: corpus.Case, folder: Path) -> Instance:
    path = folder / f"{case.name}.dcm"
    path.write_bytes(case.file_bytes)
    return Instance(
        id=1,
        sop_instance_uid=case.sop_instance_uid,
        sop_class_uid=case.sop_class_uid,
        study_instance_uid=case.study_instance_uid,
        transfer_syntax_uid=case.transfer_syntax_uid,
        path=path.name,
        sha256="0" * 64,
        size=len(case.file_bytes),
        state="processing",
        attempts=1,
    )


@pytest.fixture(scope="module")
def processing_context(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> pipeline.ProcessingContext:
    folder = tmp_path_factory.mktemp("corpus-pipeline")
    return pipeline.ProcessingContext(data_dir=folder, scorer=Scorer(load_checkpoint(tiny_checkpoint), threads=1))


def decoded_bytes(ds: pydicom.Dataset) -> int:
    return int(ds.Rows) * int(ds.Columns) * int(ds.NumberOfFrames) * int(ds.BitsAllocated) // 8


def test_undecodable_tomosynthesis_unsupported_not_failed(processing_context: pipeline.ProcessingContext) -> None:
    case = CASES[corpus.SEED]["tomosynthesis-undecodable"]
    with pytest.raises(dicom_pixels.PixelDataError, match="failed to decode Pixel Data"):
        dicom_pixels.decode_stored_values(case.dataset())  # decoding it would fail

    outcome, _, view = pipeline.evaluate(spooled_instance(case, processing_context.data_dir), processing_context)

    assert outcome.status == "unsupported"
    assert "Breast Tomosynthesis" in outcome.reason
    assert view is None


def test_compressed_tomosynthesis_never_decoded(processing_context: pipeline.ProcessingContext) -> None:
    """A 20-frame RLE object that decodes to 80 MiB is rejected with a small traced peak."""
    builder = corpus.CorpusBuilder(corpus.SEED)
    ds = builder.tomosynthesis("tomosynthesis-compressed", 20, shape=(2048, 1024))
    ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    case = builder.add("tomosynthesis-compressed", "other", "RLE Breast Tomosynthesis", builder.tomosynthesis_expected(), ds)
    size = decoded_bytes(ds)
    instance = spooled_instance(case, processing_context.data_dir)

    tracemalloc.start()
    try:
        outcome, _, _ = pipeline.evaluate(instance, processing_context)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert outcome.status == "unsupported"
    # The encoded file is read whole; a decoded copy of the frames would add `size` bytes.
    assert peak < len(case.file_bytes) * 3 + 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.0f} MiB of frames"
    assert peak < size / 4


def test_uncompressed_tomosynthesis_pixel_data_not_read(processing_context: pipeline.ProcessingContext) -> None:
    """Rejecting a volume by its header should not load its Pixel Data (80 MiB here)."""
    builder = corpus.CorpusBuilder(corpus.SEED)
    ds = builder.tomosynthesis("tomosynthesis-large", 20, shape=(2048, 1024))
    case = builder.add("tomosynthesis-large", "other", "uncompressed Breast Tomosynthesis", builder.tomosynthesis_expected(), ds)
    size = decoded_bytes(ds)
    instance = spooled_instance(case, processing_context.data_dir)
    del ds, builder

    tracemalloc.start()
    try:
        outcome, _, _ = pipeline.evaluate(instance, processing_context)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert outcome.status == "unsupported"
    assert peak < size / 4, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.0f} MiB of Pixel Data"


def test_read_without_file_meta_matches_twin() -> None:
    """A dataset file without file meta, read with force=True, decodes like its twin."""
    cases = CASES[corpus.SEED]
    ds = pydicom.dcmread(io.BytesIO(cases["no-file-meta"].file_bytes), force=True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    stored = dicom_pixels.decode_stored_values(ds)
    assert np.array_equal(stored, cases["plain"].dataset().pixel_array)

"""Secondary Capture export: build from real GE headers and real scores, write, validate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

import dicom_factory
from model.preprocess import PREPROCESSING_VERSION, PreprocessedView, ViewMetadata, preprocess_dataset
from model.scoring import Scorer, ViewScore
from worker import export

MODEL_NAME = "tiny"
UID_ROOT = "1.2.826.0.1.3680043.10.543."


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint: Path) -> Scorer:
    return Scorer(tiny_checkpoint, threads=1)


def make_source(number: int, view_position: str = "MLO", header: str = dicom_factory.GE_FOR_PRESENTATION):
    """A 256x256 test mammogram: mini-MIAS film ``number`` in a real GE header."""
    laterality = dicom_factory.mias_laterality(number)
    pixels = dicom_factory.to_bits(dicom_factory.load_mias(number)[::4, ::4], 12)
    return dicom_factory.make_mammogram(pixels, laterality, view_position, header=header)


def make_view(number: int, view_position: str = "MLO") -> PreprocessedView:
    """A 128x128 view of film ``number``, mirrored for right breasts to put the chest wall left."""
    laterality = dicom_factory.mias_laterality(number)
    image = dicom_factory.load_mias(number)[::8, ::8].astype(np.float32) / 255.0
    flipped = laterality == "R"
    if flipped:
        image = image[:, ::-1]
    metadata = ViewMetadata(
        laterality=laterality,
        view_position=view_position,
        flipped=flipped,
        crop_box=(0, 0, 1024, 1024),
        source_shape=(1024, 1024),
        warnings=("test view made by striding, not by model.preprocess",),
    )
    return PreprocessedView(np.ascontiguousarray(image), metadata)


def build(source, view: PreprocessedView, score: ViewScore, model_version: str, uid_root: str | None = None):
    return export.build_secondary_capture(
        source,
        view,
        score,
        model_version=model_version,
        model_name=MODEL_NAME,
        preprocessing_version=PREPROCESSING_VERSION,
        uid_root=uid_root,
    )


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Lines of ``dciodvfy`` output that start with "Error", and the whole output."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy not found; install the dicom3tools package")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


@pytest.mark.parametrize(
    ("number", "header"),
    [
        (3, dicom_factory.GE_FOR_PRESENTATION),
        (4, dicom_factory.GE_FOR_PROCESSING),
        (8, dicom_factory.GE_UTF8_NAME),
    ],
)
def test_dciodvfy_reports_no_errors(data_dir, scorer, tmp_path, number, header):
    source = make_source(number, header=header)
    view = make_view(number)
    score = scorer.score(view.image, view.metadata.laterality, view.metadata.view_position)

    path = export.write_secondary_capture(build(source, view, score, scorer.model_version), tmp_path)

    errors, output = dciodvfy_errors(path)
    assert errors == [], f"dciodvfy reported errors:\n{output}"


def test_read_back_references_source(data_dir, scorer, tmp_path):
    source = make_source(3)
    view = make_view(3)
    score = scorer.score(view.image, "R", "MLO")

    path = export.write_secondary_capture(build(source, view, score, scorer.model_version), tmp_path)
    sc = pydicom.dcmread(path)

    assert path == tmp_path / source.StudyInstanceUID / f"{sc.SOPInstanceUID}.dcm"
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert len(sc.SourceImageSequence) == 1
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.PatientName == source.PatientName
    assert sc.AccessionNumber == source.AccessionNumber
    assert sc.StudyDate == source.StudyDate
    assert sc.ContentDate == source.ContentDate
    assert sc.ContentTime == source.ContentTime
    assert "InstanceCreationTime" not in sc
    assert sc.Modality == "OT"
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert sc.SeriesNumber == export.SERIES_NUMBER
    assert sc.SeriesDescription == f"VAE anomaly map {MODEL_NAME} {scorer.model_version}"
    assert sc.Manufacturer == export.MANUFACTURER
    assert f"model {scorer.model_version}" in sc.SoftwareVersions
    assert sc.Laterality == "R"
    # The source's rows run posterior (P\L); mirroring makes them run anterior.
    assert list(source.PatientOrientation) == ["P", "L"]
    assert list(sc.PatientOrientation) == ["A", "L"]
    assert "not a medical device" in sc.ImageComments
    assert "not a medical device" in sc.DerivationDescription
    assert f"{score.z_score:.4f}" in sc.ImageComments
    assert sc.PhotometricInterpretation == "MONOCHROME2"
    assert sc.BitsStored == 8


def test_panels_show_view_reconstruction_and_text(data_dir, scorer):
    view = make_view(4)
    score = scorer.score(view.image, "L", "MLO")

    sc = build(make_source(4), view, score, scorer.model_version)
    pixels = sc.pixel_array
    size = view.image.shape[0] * export.PANEL_SCALE
    (row0, col0), (row1, col1), (row2, col2) = export.panel_origins(size)

    expected_view = export.upscale(export.to_uint8(view.image))
    expected_reconstruction = export.upscale(export.to_uint8(score.reconstruction))
    np.testing.assert_array_equal(pixels[row0 : row0 + size, col0 : col0 + size], expected_view)
    np.testing.assert_array_equal(pixels[row1 : row1 + size, col1 : col1 + size], expected_reconstruction)
    difference = pixels[row2 : row2 + size, col2 : col2 + size].astype(np.float64) / 255.0
    expected_difference = np.clip(np.abs(view.image - score.reconstruction) * export.DIFFERENCE_GAIN, 0, 1)
    np.testing.assert_allclose(difference, export.upscale(expected_difference), atol=1 / 255 + 1e-6)

    strip = pixels[export.text_strip_top(size) :, :]
    assert strip.shape[0] >= 5 * export.TEXT_LINE_HEIGHT
    assert np.count_nonzero(strip) > 2000, "the text strip below the panels has no burned-in text"
    first_line = strip[: export.TEXT_LINE_HEIGHT]
    assert np.count_nonzero(first_line) > 300, "the research notice line is empty"


@pytest.mark.parametrize(
    ("source_orientation", "chest_wall", "flipped", "flipped_vertical", "expected"),
    [
        (["A", "FR"], "left", False, False, ["A", "FR"]),
        (["P", "L"], "right", True, False, ["A", "L"]),
        (["P", "HL"], "right", True, True, ["A", "FR"]),
        # Chest wall at the top: turned counter-clockwise, so the old left edge (patient
        # right) ends at the bottom.
        (["L", "A"], "top", False, False, ["A", "R"]),
        (["L", "P"], "bottom", False, False, ["A", "L"]),
        (None, "right", True, False, []),
    ],
)
def test_patient_orientation_follows_preprocessing(source_orientation, chest_wall, flipped, flipped_vertical, expected):
    source = pydicom.Dataset()
    if source_orientation is not None:
        source.PatientOrientation = source_orientation
    metadata = ViewMetadata(
        laterality="R",
        view_position="MLO",
        flipped=flipped,
        crop_box=(0, 0, 10, 10),
        source_shape=(10, 10),
        chest_wall=chest_wall,
        flipped_vertical=flipped_vertical,
    )

    assert export.patient_orientation(source, metadata) == expected


@pytest.mark.parametrize(("number", "view_position"), [(3, "MLO"), (8, "CC")])
def test_preprocessed_view_exports_cleanly(data_dir, scorer, tmp_path, number, view_position):
    source = make_source(number, view_position)
    view = preprocess_dataset(source)
    score = scorer.score(view.image, view.metadata.laterality, view.metadata.view_position)

    path = export.write_secondary_capture(build(source, view, score, scorer.model_version), tmp_path)

    errors, output = dciodvfy_errors(path)
    assert errors == [], f"dciodvfy reported errors:\n{output}"
    sc = pydicom.dcmread(path)
    assert sc.Laterality == view.metadata.laterality
    assert list(sc.PatientOrientation) == export.patient_orientation(source, view.metadata)
    assert sc.PatientOrientation[0] == "A", "the chest wall is not on the left of the panels"


def test_text_lines_state_model_and_verdict(scorer):
    view = make_view(3)
    calibrated = ViewScore(
        reconstruction=np.zeros((128, 128), np.float32),
        error_map=np.zeros((128, 128), np.float32),
        reconstruction_error=0.02,
        z_score=2.5,
        threshold=0.015,
        anomalous=True,
        calibration_group="R-MLO",
    )

    lines = export.summary_lines(view, calibrated, MODEL_NAME, "abc123", PREPROCESSING_VERSION)

    assert lines[0] == "NOT FOR DIAGNOSTIC USE - RESEARCH SOFTWARE"
    assert f"Model {MODEL_NAME} abc123" in lines[1]
    assert "mirrored" in lines[2]
    assert lines[3] == "z-score +2.50: ABOVE THRESHOLD"
    assert "threshold 0.015" in lines[4]


def test_uncalibrated_score_builds(data_dir, scorer):
    view = make_view(4)
    score = ViewScore(
        reconstruction=np.full((128, 128), 0.5, np.float32),
        error_map=(view.image - 0.5) ** 2,
        reconstruction_error=float(np.mean((view.image - 0.5) ** 2)),
        z_score=None,
        threshold=None,
        anomalous=None,
        calibration_group=None,
    )

    sc = build(make_source(4), view, score, scorer.model_version)

    assert "z-score n/a" in sc.ImageComments
    assert "no threshold" in sc.ImageComments


def test_build_is_deterministic(data_dir, scorer, tmp_path):
    source = make_source(3)
    view = make_view(3)
    first_score = scorer.score(view.image, "R", "MLO")
    second_score = scorer.score(view.image, "R", "MLO")

    first = export.write_secondary_capture(build(source, view, first_score, scorer.model_version), tmp_path / "a")
    second = export.write_secondary_capture(build(source, view, second_score, scorer.model_version), tmp_path / "b")

    assert first.relative_to(tmp_path / "a") == second.relative_to(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    series_uid, sop_uid = export.secondary_capture_uids(
        source.SOPInstanceUID,
        scorer.model_version,
        None,
        study_instance_uid=source.StudyInstanceUID,
        laterality=view.metadata.laterality,
        preprocessing_version=scorer.preprocessing_version,
    )
    written = pydicom.dcmread(first)
    assert written.SeriesInstanceUID == series_uid
    assert written.SOPInstanceUID == sop_uid


def test_utf8_patient_name_survives(data_dir, scorer, tmp_path):
    source = make_source(8, header=dicom_factory.GE_UTF8_NAME)
    view = make_view(8)
    score = scorer.score(view.image, "L", "MLO")
    assert source.SpecificCharacterSet == "ISO_IR 192"
    assert not str(source.PatientName).isascii()

    path = export.write_secondary_capture(build(source, view, score, scorer.model_version), tmp_path)
    sc = pydicom.dcmread(path)

    assert sc.SpecificCharacterSet == "ISO_IR 192"
    assert str(sc.PatientName) == str(source.PatientName)
    assert str(source.PatientName).encode("utf-8") in path.read_bytes()


def test_secondary_capture_uids_are_derived():
    source_uid = dicom_factory.derived_uid("instance", "uids")

    series_uid, sop_uid = export.secondary_capture_uids(source_uid, "0123456789abcdef", None)
    rooted_series, rooted_sop = export.secondary_capture_uids(source_uid, "0123456789abcdef", UID_ROOT)
    other_series, other_sop = export.secondary_capture_uids(source_uid, "fedcba9876543210", None)

    assert (series_uid, sop_uid) == export.secondary_capture_uids(source_uid, "0123456789abcdef", None)
    assert series_uid != sop_uid
    assert series_uid.startswith("2.25.")
    assert rooted_series.startswith(UID_ROOT)
    assert rooted_sop.startswith(UID_ROOT)
    assert other_series != series_uid
    assert other_sop != sop_uid
    for uid in (series_uid, sop_uid, rooted_series, rooted_sop):
        assert export.is_valid_uid(uid), uid
        assert pydicom.uid.UID(uid).is_valid, uid


def test_secondary_capture_series_per_breast():
    study_uid = dicom_factory.derived_uid("study", "uids")
    cc_uid = dicom_factory.derived_uid("instance", "cc")
    mlo_uid = dicom_factory.derived_uid("instance", "mlo")
    other_breast_uid = dicom_factory.derived_uid("instance", "other breast")

    cc_series, cc_sop = export.secondary_capture_uids(
        cc_uid, "0123456789abcdef", None, study_instance_uid=study_uid, laterality="L"
    )
    mlo_series, mlo_sop = export.secondary_capture_uids(
        mlo_uid, "0123456789abcdef", None, study_instance_uid=study_uid, laterality="L"
    )
    other_series, _ = export.secondary_capture_uids(
        other_breast_uid, "0123456789abcdef", None, study_instance_uid=study_uid, laterality="R"
    )
    _, repreprocessed_sop = export.secondary_capture_uids(
        cc_uid, "0123456789abcdef", None, study_instance_uid=study_uid, laterality="L", preprocessing_version="other"
    )

    assert cc_series == mlo_series
    assert other_series != cc_series
    assert cc_sop != mlo_sop
    assert repreprocessed_sop != cc_sop


@pytest.mark.parametrize(
    "uid_root",
    ["1.2.3", "1.2.a.", "1..2.", "01.2.", ".1.2.", "", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22."],
)
def test_invalid_uid_root_raises(uid_root):
    with pytest.raises(ValueError, match="uid_root"):
        export.secondary_capture_uids("1.2.3.4", "0123456789abcdef", uid_root)


def test_invalid_source_uid_raises():
    with pytest.raises(ValueError, match="not a valid UID"):
        export.secondary_capture_uids("1.2.3/../4", "0123456789abcdef", None)


def test_write_rejects_uid_unsafe_as_path(data_dir, scorer, tmp_path):
    view = make_view(4)
    sc = build(make_source(4), view, scorer.score(view.image, "L", "MLO"), scorer.model_version)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        sc.StudyInstanceUID = "../1.2.3"

    with pytest.raises(ValueError, match="StudyInstanceUID"):
        export.write_secondary_capture(sc, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_leaves_no_temporary_file(data_dir, scorer, tmp_path):
    view = make_view(4)
    sc = build(make_source(4), view, scorer.score(view.image, "L", "MLO"), scorer.model_version)

    path = export.write_secondary_capture(sc, tmp_path)
    export.write_secondary_capture(sc, tmp_path)

    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_shape_mismatch_raises(data_dir, scorer):
    view = make_view(4)
    score = scorer.score(view.image, "L", "MLO")
    small = ViewScore(
        reconstruction=score.reconstruction[:64, :64],
        error_map=score.error_map,
        reconstruction_error=score.reconstruction_error,
        z_score=score.z_score,
        threshold=score.threshold,
        anomalous=score.anomalous,
        calibration_group=score.calibration_group,
    )

    with pytest.raises(ValueError, match="score.reconstruction has shape"):
        build(make_source(4), view, small, scorer.model_version)


@pytest.mark.parametrize("model_name", ["", "tiny\\model", "naïve", "x" * 60])
def test_invalid_model_name_raises(data_dir, scorer, model_name):
    view = make_view(4)
    score = scorer.score(view.image, "L", "MLO")

    with pytest.raises(ValueError, match="model_name"):
        export.build_secondary_capture(
            make_source(4),
            view,
            score,
            model_version=scorer.model_version,
            model_name=model_name,
            preprocessing_version=PREPROCESSING_VERSION,
        )

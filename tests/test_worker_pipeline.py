"""Processing: every accepted transfer syntax, study summaries, unsupported and failed views.

One worker runs in this process for the module, with one processing thread and the tiny
untrained checkpoint. Each test sends its own objects (their UIDs derive from the test's
key) and waits for their results.
"""

from __future__ import annotations

import copy
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import dicom_factory
from worker import scp
from worker.serve import Worker
from worker_support import (
    assign_uids,
    dcmtk,
    four_view_study,
    instances,
    running_worker,
    send,
    single_view,
    wait_for_results,
    wait_for_study,
    wait_for_view,
    worker_settings,
)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Worker]:
    data_dir = tmp_path_factory.mktemp("pipeline") / "data"
    with running_worker(worker_settings(data_dir, unused_port(), tiny_checkpoint)) as running:
        yield running


def eight_bit_view(key: str) -> Dataset:
    """A view with 8-bit samples in 8 bits allocated, as JPEG Baseline requires."""
    ds = single_view(key, bits_stored=8)
    pixels = ds.pixel_array.astype(np.uint8)
    ds.BitsAllocated = 8
    ds.PixelData = pixels.tobytes()
    return ds


def convert_with_dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def convert(source: Path, target: Path) -> None:
        result = subprocess.run(
            [dcmtk(tool), *options, str(source), str(target)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(options)} failed: {result.stderr}")

    return convert


def compress_with_pydicom(syntax: str, **options: object) -> Callable[[Path, Path], None]:
    def convert(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, generate_instance_uid=False, **options)
        ds.save_as(target, enforce_file_format=True)

    return convert


@dataclass(frozen=True)
class SyntaxCase:
    syntax: str
    convert: Callable[[Path, Path], None] | None
    bits_stored: int = 12
    # Largest absolute difference allowed from the uncompressed twin; 0 for lossless.
    max_error: int | None = 0
    # For lossy syntaxes without a hard bound: mean absolute difference over the full scale.
    max_mean_error: float = 0.0


# dcmcjpeg's lossy modes stretch the pixels' min..max to the full range unless +sr
# (--scaling-range) keeps the stored range, which the comparison with the twin needs.
CASES = {
    "explicit-little": SyntaxCase(ExplicitVRLittleEndian, None),
    "implicit-little": SyntaxCase(ImplicitVRLittleEndian, convert_with_dcmtk("dcmconv", "+ti")),
    "explicit-big": SyntaxCase(ExplicitVRBigEndian, convert_with_dcmtk("dcmconv", "+tb")),
    "deflated": SyntaxCase(DeflatedExplicitVRLittleEndian, convert_with_dcmtk("dcmconv", "+td")),
    "jpeg-baseline": SyntaxCase(
        JPEGBaseline8Bit, convert_with_dcmtk("dcmcjpeg", "+eb", "+sr"), bits_stored=8, max_error=None, max_mean_error=0.01
    ),
    "jpeg-extended": SyntaxCase(JPEGExtended12Bit, convert_with_dcmtk("dcmcjpeg", "+ee", "+sr"), max_error=None, max_mean_error=0.01),
    "jpeg-lossless": SyntaxCase(JPEGLossless, convert_with_dcmtk("dcmcjpeg", "+el")),
    "jpeg-lossless-sv1": SyntaxCase(JPEGLosslessSV1, convert_with_dcmtk("dcmcjpeg", "+e1")),
    "jpeg-ls-lossless": SyntaxCase(JPEGLSLossless, compress_with_pydicom(JPEGLSLossless)),
    "jpeg-ls-near-lossless": SyntaxCase(
        JPEGLSNearLossless, compress_with_pydicom(JPEGLSNearLossless, jls_error=2), max_error=2
    ),
    "jpeg2000-lossless": SyntaxCase(JPEG2000Lossless, compress_with_pydicom(JPEG2000Lossless)),
    "jpeg2000": SyntaxCase(JPEG2000, compress_with_pydicom(JPEG2000, j2k_cr=[10]), max_error=None, max_mean_error=0.01),
    "rle": SyntaxCase(RLELossless, convert_with_dcmtk("dcmcrle")),
}


def test_every_accepted_syntax_has_case() -> None:
    covered = {case.syntax for case in CASES.values()}
    assert set(scp.decodable_transfer_syntaxes()) <= covered


@pytest.mark.parametrize("name", list(CASES))
def test_transfer_syntax_scored(name: str, worker: Worker, tmp_path: Path) -> None:
    case = CASES[name]
    if case.syntax not in scp.decodable_transfer_syntaxes():
        pytest.skip(f"no decoder installed for {case.syntax.name}")
    twin = eight_bit_view(f"syntax-{name}") if case.bits_stored == 8 else single_view(f"syntax-{name}")
    source = tmp_path / "twin.dcm"
    twin.save_as(source, enforce_file_format=True)
    sent = source
    if case.convert is not None:
        sent = tmp_path / "sent.dcm"
        case.convert(source, sent)
    header = pydicom.dcmread(sent, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == case.syntax

    assert send(worker.port, [sent]) == [0x0000]
    results = wait_for_results(worker.data_dir, 1, study=twin.StudyInstanceUID)
    assert len(results) == 1
    assert results[0].status == "scored", results[0].reason
    assert results[0].reconstruction_error is not None

    # DCMTK gives a lossy compressed image a new SOP Instance UID, as DICOM requires.
    row = next(row for row in instances(worker.data_dir) if row.sop_instance_uid == header.SOPInstanceUID)
    assert row.transfer_syntax_uid == case.syntax
    received = pydicom.dcmread(worker.data_dir / row.path)
    assert received.file_meta.TransferSyntaxUID == case.syntax
    decoded = received.pixel_array.astype(np.int64)
    expected = twin.pixel_array.astype(np.int64)
    assert decoded.shape == expected.shape
    difference = np.abs(decoded - expected)
    if case.max_error is not None:
        assert int(difference.max()) <= case.max_error
    else:
        full_scale = (1 << case.bits_stored) - 1
        assert float(difference.mean()) / full_scale <= case.max_mean_error


def test_four_view_study_summary(worker: Worker) -> None:
    datasets = four_view_study("pipeline-four-views")
    study_uid = datasets[0].StudyInstanceUID
    assert send(worker.port, datasets) == [0x0000] * 4

    results = wait_for_results(worker.data_dir, 4, study=study_uid)
    assert [result.status for result in results] == ["scored"] * 4
    study = wait_for_study(worker.data_dir, study_uid)
    assert study is not None
    assert study.state == "complete"
    assert study.scored_views == 4
    for side, maximum in (("L", study.max_z_left), ("R", study.max_z_right)):
        expected = max(result.z_score for result in results if result.laterality == side)
        assert maximum == pytest.approx(expected)
    assert study.flagged == any(result.anomalous for result in results)

    for result in results:
        assert result.model_version == worker.scorer.model_version
        assert result.preprocessing_version == worker.scorer.preprocessing_version
        assert result.calibration_group == f"{result.laterality}-{result.view_position}"
        for timing in (result.decode_ms, result.preprocess_ms, result.inference_ms, result.export_ms, result.database_ms):
            assert timing is not None
            assert timing >= 0.0
        assert result.sc_path is not None
        sc = pydicom.dcmread(worker.data_dir / result.sc_path)
        assert sc.SOPClassUID == SECONDARY_CAPTURE
        assert sc.SOPInstanceUID == result.sc_sop_instance_uid
        assert sc.StudyInstanceUID == study_uid


def test_later_instance_reopens_study(worker: Worker) -> None:
    datasets = four_view_study("pipeline-reopen")
    study_uid = datasets[0].StudyInstanceUID
    assert send(worker.port, datasets) == [0x0000] * 4
    assert wait_for_study(worker.data_dir, study_uid).scored_views == 4

    extra = assign_uids(copy.deepcopy(datasets[0]), "pipeline-reopen", "extra")
    assert send(worker.port, [extra]) == [0x0000]
    results = wait_for_results(worker.data_dir, 5, study=study_uid)
    assert len(results) == 5
    study = wait_for_study(worker.data_dir, study_uid)
    assert study.state == "complete"
    assert study.scored_views == 5


def test_for_processing_unsupported(worker: Worker, data_dir: Path) -> None:
    built = single_view("pipeline-for-processing", header=dicom_factory.GE_FOR_PROCESSING)
    real = data_dir / "dicom-mg" / dicom_factory.GE_FOR_PROCESSING
    real_uid = pydicom.dcmread(real, stop_before_pixels=True).SOPInstanceUID
    assert send(worker.port, [built]) == [0x0000]
    assert send(worker.port, [real]) == [0x0000]

    for sop_instance_uid in (built.SOPInstanceUID, real_uid):
        result = wait_for_view(worker.data_dir, sop_instance_uid)
        assert result.status == "unsupported"
        assert "For Processing" in result.reason
        assert result.reconstruction_error is None
        assert result.sc_path is None


def test_truncated_pixel_data_failed(worker: Worker) -> None:
    ds = single_view("pipeline-truncated")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert send(worker.port, [ds]) == [0x0000]
    result = wait_for_view(worker.data_dir, ds.SOPInstanceUID)
    assert result.status == "failed"
    assert result.reason
    assert result.z_score is None


def test_conflicting_content_scored_separately(worker: Worker) -> None:
    first = single_view("pipeline-conflict")
    second = copy.deepcopy(first)
    pixels = second.pixel_array.copy()
    pixels[: pixels.shape[0] // 4] = 0
    second.PixelData = pixels.astype("<u2").tobytes()
    assert send(worker.port, [first]) == [0x0000]
    assert send(worker.port, [second]) == [0x0000]

    results = wait_for_results(worker.data_dir, 2, study=first.StudyInstanceUID)
    assert [result.status for result in results] == ["scored", "scored"]
    assert results[0].warnings is None
    assert "received before with other content" in results[1].warnings
    assert results[0].reconstruction_error != results[1].reconstruction_error
    assert results[0].sc_sop_instance_uid != results[1].sc_sop_instance_uid
    assert results[0].sc_path != results[1].sc_path


def test_same_input_same_outputs(worker: Worker, tmp_path: Path, tiny_checkpoint: Path) -> None:
    ds = single_view("pipeline-repeat")
    assert send(worker.port, [ds]) == [0x0000]
    first = wait_for_view(worker.data_dir, ds.SOPInstanceUID)

    settings = worker_settings(tmp_path / "again", unused_port(), tiny_checkpoint)
    with running_worker(settings) as other:
        assert send(other.port, [ds]) == [0x0000]
        second = wait_for_view(other.data_dir, ds.SOPInstanceUID)
        for column in ("status", "reconstruction_error", "z_score", "threshold", "anomalous", "sc_sop_instance_uid", "sc_path"):
            assert getattr(first, column) == getattr(second, column)
        assert (worker.data_dir / first.sc_path).read_bytes() == (other.data_dir / second.sc_path).read_bytes()


def test_quiet_study_completes(tmp_path: Path, tiny_checkpoint: Path) -> None:
    datasets = four_view_study("pipeline-quiet")[:2]
    study_uid = datasets[0].StudyInstanceUID
    settings = worker_settings(tmp_path / "quiet", unused_port(), tiny_checkpoint, processing__quiet_period_s=1.0)
    with running_worker(settings) as running:
        assert send(running.port, datasets) == [0x0000, 0x0000]
        study = wait_for_study(running.data_dir, study_uid, timeout=20)
    assert study is not None
    assert study.state == "complete"
    assert study.scored_views == 2


def test_interrupted_too_often_failed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ds = single_view("pipeline-attempts")
    port = unused_port()
    with running_worker(worker_settings(tmp_path / "data", port, tiny_checkpoint, processing__workers=0)) as running:
        assert send(running.port, [ds]) == [0x0000]
        data_dir = running.data_dir
    # Three earlier runs died while processing this instance.
    with sqlite3.connect(data_dir / "results.sqlite") as connection:
        connection.execute("UPDATE instances SET state = 'processing', attempts = 3")

    settings = worker_settings(data_dir, port, tiny_checkpoint, processing__max_attempts=3)
    with running_worker(settings):
        result = wait_for_view(data_dir, ds.SOPInstanceUID)
    assert result.status == "failed"
    assert "interrupted 3 times" in result.reason
    assert [row.state for row in instances(data_dir)] == ["done"]

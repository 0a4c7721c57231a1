"""The storage SCP: associations, durable receive, duplicates and rejected requests.

The worker runs in this process with no processing threads, so every received instance
stays queued and the tests see exactly what the C-STORE handler recorded.
"""

from __future__ import annotations

import copy
import io
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from worker import scp
from worker_support import (
    dcmtk,
    deterministic_uid,
    echo,
    instances,
    running_worker,
    send,
    single_view,
    worker_settings,
)

MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def receive_only(tmp_path: Path, port: int, checkpoint: Path, **overrides: object):
    settings = worker_settings(tmp_path / "data", port, checkpoint, processing__workers=0, **overrides)
    return running_worker(settings)


def write_raw_part10(path: Path, sop_instance_uid: str, transfer_syntax: str, body: bytes) -> Path:
    """A Part 10 file whose dataset is ``body`` as given, for requests pydicom cannot build."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMOGRAPHY_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    buffer.write(body)
    path.write_bytes(buffer.getvalue())
    return path


def encode_explicit_little(ds: pydicom.Dataset) -> bytes:
    """The dataset's elements in Explicit VR Little Endian, without preamble or file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_accepted_transfer_syntaxes_are_decodable() -> None:
    syntaxes = scp.decodable_transfer_syntaxes()
    assert ExplicitVRLittleEndian in syntaxes
    assert DeflatedExplicitVRLittleEndian in syntaxes
    for uid in syntaxes:
        assert pydicom.pixels.get_decoder(uid).is_available


def test_echo_pynetdicom_and_echoscu(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    with receive_only(tmp_path, free_port, tiny_checkpoint):
        assert echo(free_port) == 0
        result = subprocess.run(
            [dcmtk("echoscu"), "-aec", "MAMMOVAE", "127.0.0.1", str(free_port)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr


def test_disallowed_calling_ae_rejected(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    with receive_only(tmp_path, free_port, tiny_checkpoint, dicom__allowed_calling_ae_titles=["MODALITY"]):
        assert echo(free_port, calling_ae_title="INTRUDER") is None
        assert echo(free_port, calling_ae_title="MODALITY") == 0
        stored = subprocess.run(
            [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "MAMMOVAE", "127.0.0.1", str(free_port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stored.returncode != 0


def test_store_spools_part10_file(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    ds = single_view("scp-spool")
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [ds], calling_ae_title="MODALITY") == [0x0000]
        data_dir = worker.data_dir

    rows = instances(data_dir)
    assert len(rows) == 1
    row = rows[0]
    assert row.state == "queued"
    assert row.sop_instance_uid == ds.SOPInstanceUID
    assert row.study_instance_uid == ds.StudyInstanceUID
    assert row.calling_ae_title == "MODALITY"
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian
    assert row.path.startswith("spool/")
    assert row.path.endswith(".dcm")

    spooled = pydicom.dcmread(data_dir / row.path)
    assert spooled.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert spooled.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert spooled.SOPInstanceUID == ds.SOPInstanceUID
    assert spooled.PixelData == ds.PixelData
    assert not list((data_dir / "spool").rglob(".partial-*"))


def test_storescu_stores_file(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    path = tmp_path / "view.dcm"
    single_view("scp-storescu").save_as(path, enforce_file_format=True)
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        result = subprocess.run(
            [dcmtk("storescu"), "-aec", "MAMMOVAE", "127.0.0.1", str(free_port), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert len(instances(worker.data_dir)) == 1


def test_free_disk_floor_out_of_resources(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    with receive_only(tmp_path, free_port, tiny_checkpoint, storage__free_disk_floor_mb=10**12) as worker:
        assert send(free_port, [single_view("scp-floor")]) == [0xA700]
        assert echo(free_port) == 0
        data_dir = worker.data_dir
    assert instances(data_dir) == []
    assert not list((data_dir / "spool").rglob("*.dcm"))


def test_duplicate_same_content_stored_once(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    ds = single_view("scp-duplicate")
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [ds]) == [0x0000]
        assert send(free_port, [ds]) == [0x0000]
        data_dir = worker.data_dir
    rows = instances(data_dir)
    assert len(rows) == 1
    assert rows[0].conflicts_with_id is None
    assert len(list((data_dir / "spool").rglob("*.dcm"))) == 1


def test_same_uid_other_content_kept(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    first = single_view("scp-conflict")
    second = copy.deepcopy(first)
    pixels = np.frombuffer(second.PixelData, dtype="<u2").copy()
    pixels[:100] = 1234
    second.PixelData = pixels.tobytes()
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [first]) == [0x0000]
        assert send(free_port, [second]) == [0x0000]
        data_dir = worker.data_dir
    rows = instances(data_dir)
    assert len(rows) == 2
    assert rows[0].sop_instance_uid == rows[1].sop_instance_uid
    assert rows[0].sha256 != rows[1].sha256
    assert rows[1].conflicts_with_id == rows[0].id
    assert rows[0].path != rows[1].path
    assert (data_dir / rows[0].path).is_file()
    assert (data_dir / rows[1].path).is_file()


def test_undecodable_dataset_cannot_understand(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    # Bytes that are not a deflate stream, sent as Deflated Explicit VR Little Endian.
    body = b"not a deflate stream" * 20
    with pytest.raises(zlib.error):
        zlib.decompress(body, -zlib.MAX_WBITS)
    path = write_raw_part10(tmp_path / "broken.dcm", deterministic_uid("instance", "broken"), DeflatedExplicitVRLittleEndian, body)
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [path]) == [0xC210]
        assert echo(free_port) == 0
        data_dir = worker.data_dir
    assert instances(data_dir) == []


def test_sop_class_mismatch_rejected(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    ds = single_view("scp-mismatch")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage inside a mammography request
    path = write_raw_part10(tmp_path / "mismatch.dcm", ds.SOPInstanceUID, ExplicitVRLittleEndian, encode_explicit_little(ds))
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [path]) == [0xA900]
        assert echo(free_port) == 0
        data_dir = worker.data_dir
    assert instances(data_dir) == []


def test_sop_instance_mismatch_rejected(tmp_path: Path, free_port: int, tiny_checkpoint: Path) -> None:
    ds = single_view("scp-instance-mismatch")
    body = encode_explicit_little(ds)
    path = write_raw_part10(tmp_path / "other-uid.dcm", deterministic_uid("instance", "other"), ExplicitVRLittleEndian, body)
    with receive_only(tmp_path, free_port, tiny_checkpoint) as worker:
        assert send(free_port, [path]) == [0xC211]
        data_dir = worker.data_dir
    assert instances(data_dir) == []

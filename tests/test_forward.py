"""Forwarding of Secondary Captures with C-STORE to real peers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage

import dicom_factory
from model.preprocess import PREPROCESSING_VERSION, PreprocessedView, ViewMetadata
from model.scoring import Scorer
from worker import export, forward
from worker.db import ExportJob, Instance, ViewResult, open_database

STORESCP_AE = "STORESCP"
CALLING_AE = "MAMMOVAE"


# --- peers --------------------------------------------------------------------------------


def find_dcmtk(name: str) -> str | None:
    """Path of the DCMTK tool ``name``; pynetdicom installs apps with the same names."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / name
        if not candidate.is_file() or not os.access(candidate, os.X_OK):
            continue
        version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def storescp_binary() -> str:
    binary = find_dcmtk("storescp")
    if binary is None:
        pytest.fail("DCMTK storescp not found on PATH; install the dcmtk package")
    return binary


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


@contextlib.contextmanager
def run_storescp(binary: str, port: int, folder: Path, *options: str) -> Iterator[subprocess.Popen]:
    """Run DCMTK storescp on ``port``, writing received objects into ``folder``.

    DCMTK 3.6.7 storescp has no option to bind one address; tests only connect to 127.0.0.1.
    """
    folder.mkdir(parents=True, exist_ok=True)
    command = [binary, "--aetitle", STORESCP_AE, "--output-directory", str(folder), *options, str(port)]
    log = open(folder.parent / f"storescp-{port}.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def run_status_scp(port: int, status: int) -> Iterator[None]:
    """Run a pynetdicom Storage SCP on 127.0.0.1 that returns ``status`` for every C-STORE."""
    ae = AE(ae_title=STORESCP_AE)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]
    )
    try:
        yield
    finally:
        server.shutdown()


def received_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file())


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, without preamble and file meta information."""
    raw = path.read_bytes()
    meta_length = pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    # Preamble (128), "DICM" (4), the group length element (12), then the rest of group 0002.
    return raw[128 + 4 + 12 + meta_length :]


# --- queue --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secondary_capture(tiny_checkpoint: Path) -> pydicom.Dataset:
    """A real Secondary Capture: mini-MIAS film 4 in a GE header, scored by the tiny VAE."""
    pixels = dicom_factory.to_bits(dicom_factory.load_mias(4)[::4, ::4], 12)
    source = dicom_factory.make_mammogram(pixels, "L", "MLO")
    image = dicom_factory.load_mias(4)[::8, ::8].astype(np.float32) / 255.0
    view = PreprocessedView(image, ViewMetadata("L", "MLO", False, (0, 0, 1024, 1024), (1024, 1024)))
    scorer = Scorer(tiny_checkpoint, threads=1)
    return export.build_secondary_capture(
        source,
        view,
        scorer.score(image, "L", "MLO"),
        model_version=scorer.model_version,
        model_name="tiny",
        preprocessing_version=PREPROCESSING_VERSION,
    )


@pytest.fixture
def worker_dir(tmp_path: Path, data_dir: Path, secondary_capture: pydicom.Dataset) -> Path:
    """A data directory with one Secondary Capture under exports/."""
    folder = tmp_path / "data"
    export.write_secondary_capture(secondary_capture, folder / "exports")
    return folder


def sc_path_of(sc: pydicom.Dataset) -> str:
    return f"exports/{sc.StudyInstanceUID}/{sc.SOPInstanceUID}.dcm"


def add_view_result(session, sop_instance_uid: str) -> int:
    """Add the instance and view result rows that an export job refers to; return the result id."""
    instance = Instance(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=pydicom.uid.DigitalMammographyXRayImageStorageForPresentation,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        path=f"spool/{sop_instance_uid}.dcm",
        sha256="0" * 64,
        size=0,
        state="done",
    )
    session.add(instance)
    session.flush()
    result = ViewResult(instance_id=instance.id, sop_instance_uid=sop_instance_uid, status="scored")
    session.add(result)
    session.flush()
    return result.id


def queue_job(database: Path, sc: pydicom.Dataset, destination: forward.Destination) -> int:
    _, session_factory = open_database(database)
    with session_factory() as session:
        view_result_id = add_view_result(session, dicom_factory.derived_uid("forward", sc.SOPInstanceUID))
        job = forward.enqueue_export(session, view_result_id, sc.SOPInstanceUID, sc_path_of(sc), str(destination))
        session.commit()
        return job.id


def load_job(session_factory, job_id: int) -> ExportJob:
    with session_factory() as session:
        return session.get(ExportJob, job_id)


def make_forwarder(session_factory, folder: Path, destination, **overrides) -> forward.Forwarder:
    settings = {"max_attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 1.0}
    settings.update(overrides)
    return forward.Forwarder(session_factory, folder, destination, CALLING_AE, **settings)


# --- units --------------------------------------------------------------------------------


def test_destination_parse_and_str():
    destination = forward.Destination.parse("PACS@10.0.0.5:104")

    assert destination == forward.Destination("PACS", "10.0.0.5", 104)
    assert str(destination) == "PACS@10.0.0.5:104"
    assert forward.Destination.parse(" ORTHANC@pacs.example.org:4242 ").host == "pacs.example.org"


@pytest.mark.parametrize(
    "text",
    ["PACS@host", "PACS:104", "@host:104", "PACS@:104", "PACS@host:0", "PACS@host:70000", "A" * 17 + "@h:104"],
)
def test_destination_parse_rejects(text):
    with pytest.raises(ValueError, match="destination"):
        forward.Destination.parse(text)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (200, 5.0)],
)
def test_backoff_delay_doubles_and_caps(attempts, expected):
    assert forward.backoff_delay(attempts, 0.5, 5.0) == expected


def test_forwarder_rejects_bad_settings(tmp_path):
    _, session_factory = open_database(tmp_path / "results.sqlite")
    destination = forward.Destination("PACS", "127.0.0.1", 104)

    with pytest.raises(ValueError, match="max_attempts"):
        make_forwarder(session_factory, tmp_path, destination, max_attempts=0)
    with pytest.raises(ValueError, match="backoff_max_s"):
        make_forwarder(session_factory, tmp_path, destination, backoff_initial_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError, match="calling AE title"):
        forward.Forwarder(session_factory, tmp_path, destination, "A\\B", 3, 1.0, 2.0)


def test_enqueue_export_is_idempotent(tmp_path, secondary_capture):
    _, session_factory = open_database(tmp_path / "results.sqlite")
    sc = secondary_capture
    with session_factory() as session:
        view_result_id = add_view_result(session, "1.2.3.4")
        first = forward.enqueue_export(session, view_result_id, sc.SOPInstanceUID, sc_path_of(sc), "PACS@127.0.0.1:104")
        first.state = "sent"
        session.commit()

        again = forward.enqueue_export(session, view_result_id, sc.SOPInstanceUID, sc_path_of(sc), "PACS@127.0.0.1:104")
        other_destination = forward.enqueue_export(session, view_result_id, sc.SOPInstanceUID, sc_path_of(sc), "B@h:1")
        rescored = forward.enqueue_export(session, view_result_id, "1.2.3.5", "exports/1.2.3/1.2.3.5.dcm", "PACS@127.0.0.1:104")
        session.commit()

        assert again.id == first.id
        assert other_destination.id != first.id
        assert rescored.id == first.id
        assert rescored.state == "pending"
        assert rescored.sc_sop_instance_uid == "1.2.3.5"
        assert len(session.query(ExportJob).all()) == 2


def test_enqueue_export_rejects_bad_destination(tmp_path):
    _, session_factory = open_database(tmp_path / "results.sqlite")
    with session_factory() as session:
        view_result_id = add_view_result(session, "1.2.3.4")
        with pytest.raises(ValueError, match="AE@host:port"):
            forward.enqueue_export(session, view_result_id, "1.2.3.5", "exports/x.dcm", "PACS-104")


# --- real peers ---------------------------------------------------------------------------


def test_storescp_receives_secondary_capture(worker_dir, secondary_capture, storescp_binary, free_port, tmp_path):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination)

    with run_storescp(storescp_binary, free_port, tmp_path / "received"):
        sent = forwarder.run_once()

    job = load_job(session_factory, job_id)
    assert sent == 1
    assert job.state == "sent"
    assert job.attempts == 1
    assert job.last_error is None
    files = received_files(tmp_path / "received")
    assert len(files) == 1
    received = pydicom.dcmread(files[0])
    assert received.SOPInstanceUID == secondary_capture.SOPInstanceUID
    assert received.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert data_set_bytes(files[0]) == data_set_bytes(worker_dir / sc_path_of(secondary_capture))


def test_refused_destination_dies_then_retry_delivers(
    worker_dir, secondary_capture, storescp_binary, free_port, tmp_path
):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    database = worker_dir / "results.sqlite"
    job_id = queue_job(database, secondary_capture, destination)
    _, session_factory = open_database(database)
    forwarder = make_forwarder(session_factory, worker_dir, destination, max_attempts=3)

    assert forwarder.run_once() == 0
    job = load_job(session_factory, job_id)
    assert job.state == "pending"
    assert job.attempts == 1
    assert str(destination) in job.last_error
    assert "TCP connection" in job.last_error
    delay = (job.next_attempt_at - job.updated_at).total_seconds()
    assert 0.4 <= delay <= 0.6, f"first retry after {delay} s, expected 0.5 s"

    # Not due yet: a second pass right away leaves the job alone.
    forwarder.run_once()
    assert load_job(session_factory, job_id).attempts == 1

    deadline = time.monotonic() + 10
    while load_job(session_factory, job_id).state == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
        forwarder.run_once()
    job = load_job(session_factory, job_id)
    assert job.state == "dead"
    assert job.attempts == 3

    with session_factory() as session:
        assert forward.retry_dead(session, [job_id + 1000]) == 0
        assert forward.retry_dead(session, [job_id]) == 1
        session.commit()
    job = load_job(session_factory, job_id)
    assert job.state == "pending"
    assert job.attempts == 0

    # A new forwarder on a new connection, as after a restart, finds the job in the database.
    _, restarted_sessions = open_database(database)
    restarted = make_forwarder(restarted_sessions, worker_dir, destination)
    with run_storescp(storescp_binary, free_port, tmp_path / "received"):
        assert restarted.run_once() == 1
    assert load_job(restarted_sessions, job_id).state == "sent"
    assert len(received_files(tmp_path / "received")) == 1


def test_rejected_association_is_recorded(worker_dir, secondary_capture, storescp_binary, free_port, tmp_path):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination, max_attempts=1)

    with run_storescp(storescp_binary, free_port, tmp_path / "received", "--refuse"):
        assert forwarder.run_once() == 0

    job = load_job(session_factory, job_id)
    assert job.state == "dead"
    # DCMTK storescp sends A-ASSOCIATE-RJ and closes the connection at once; on a loaded
    # machine pynetdicom sometimes detects the closed socket before it has read the RJ.
    assert "association rejected" in job.last_error or "association aborted by the peer" in job.last_error
    assert str(destination) in job.last_error


def test_failure_status_is_recorded(worker_dir, secondary_capture, free_port):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination)

    with run_status_scp(free_port, 0xA700):
        assert forwarder.run_once() == 0

    job = load_job(session_factory, job_id)
    assert job.state == "pending"
    assert job.attempts == 1
    assert "status 0xA700 (Refused: Out of Resources)" in job.last_error


def test_warning_status_counts_as_sent(worker_dir, secondary_capture, free_port):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination)

    with run_status_scp(free_port, 0xB000):
        assert forwarder.run_once() == 1

    job = load_job(session_factory, job_id)
    assert job.state == "sent"
    assert job.last_error is None


def test_missing_file_is_recorded(worker_dir, secondary_capture, free_port):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    (worker_dir / sc_path_of(secondary_capture)).unlink()
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination)

    assert forwarder.run_once() == 0

    job = load_job(session_factory, job_id)
    assert job.attempts == 1
    assert "not found" in job.last_error


def test_thread_sends_on_wake_and_stops(worker_dir, secondary_capture, storescp_binary, free_port, tmp_path):
    destination = forward.Destination(STORESCP_AE, "127.0.0.1", free_port)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    # A poll interval far beyond the test's duration: only wake() can trigger the send.
    forwarder = make_forwarder(session_factory, worker_dir, destination, poll_interval_s=600.0)

    with run_storescp(storescp_binary, free_port, tmp_path / "received"):
        forwarder.start()
        try:
            time.sleep(0.2)
            job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
            forwarder.wake()
            deadline = time.monotonic() + 10
            while load_job(session_factory, job_id).state != "sent" and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            started = time.monotonic()
            forwarder.stop()
            stop_seconds = time.monotonic() - started

    assert load_job(session_factory, job_id).state == "sent"
    assert stop_seconds < 2.0
    assert len(received_files(tmp_path / "received")) == 1


# --- Orthanc ------------------------------------------------------------------------------

# Debian installs the binary in /usr/sbin, which is not on every PATH.
ORTHANC_BINARY = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


@pytest.mark.slow
@pytest.mark.skipif(ORTHANC_BINARY is None, reason="Orthanc not installed (Debian package: orthanc)")
def test_orthanc_receives_secondary_capture(worker_dir, secondary_capture, free_port, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    config = {
        "Name": "mammo-vae-worker test",
        "StorageDirectory": str(tmp_path / "orthanc-storage"),
        "IndexDirectory": str(tmp_path / "orthanc-storage"),
        "DicomAet": "ORTHANC",
        "DicomPort": free_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        # Only the worker's AE title calling from 127.0.0.1 may store.
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"worker": [CALLING_AE, "127.0.0.1", 104]},
        "Plugins": [],
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    destination = forward.Destination("ORTHANC", "127.0.0.1", free_port)
    job_id = queue_job(worker_dir / "results.sqlite", secondary_capture, destination)
    _, session_factory = open_database(worker_dir / "results.sqlite")
    forwarder = make_forwarder(session_factory, worker_dir, destination)

    log = open(tmp_path / "orthanc.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(http_port, process, timeout=30)
        wait_for_port(free_port, process, timeout=30)
        assert forwarder.run_once() == 1
        url = f"http://127.0.0.1:{http_port}/tools/lookup"
        request = urllib.request.Request(url, data=secondary_capture.SOPInstanceUID.encode("ascii"), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            matches = json.load(response)
        assert [match["Type"] for match in matches] == ["Instance"]
        file_url = f"http://127.0.0.1:{http_port}/instances/{matches[0]['ID']}/file"
        with urllib.request.urlopen(file_url, timeout=10) as response:
            (tmp_path / "from-orthanc.dcm").write_bytes(response.read())
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()

    assert load_job(session_factory, job_id).state == "sent"
    sent_file = worker_dir / sc_path_of(secondary_capture)
    assert data_set_bytes(tmp_path / "from-orthanc.dcm") == data_set_bytes(sent_file)


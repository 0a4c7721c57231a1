"""Helpers shared by the worker tests: settings, a worker in this process or a subprocess,
DICOM peers (pynetdicom and DCMTK) and waiting for results."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification
from sqlalchemy import select

import dicom_factory
from worker.db import Instance, Study, ViewResult, open_database
from worker.serve import Worker
from worker.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
TERMINAL_STATUSES = ("scored", "unsupported", "failed")


def worker_settings(data_dir: Path, port: int, checkpoint: Path, **overrides: Any) -> Settings:
    """Settings from the shipped config with a test data directory, port and checkpoint.

    ``overrides`` maps ``section__key`` to a value, for example ``processing__workers=0``.
    """
    values = {
        "storage.data_dir": str(data_dir),
        "dicom.port": port,
        "processing.checkpoint": str(checkpoint),
        "processing.workers": 1,
        "processing.poll_interval_s": 0.5,
        "storage.free_disk_floor_mb": 1,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_settings(environ={}, overrides=values)


@contextlib.contextmanager
def running_worker(settings: Settings) -> Iterator[Worker]:
    worker = Worker(settings)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def deterministic_uid(*parts: object) -> str:
    """A 2.25 UID derived from ``parts`` by a name-based UUID, the same on every run."""
    name = "\x00".join(["mammo-vae-worker tests", *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def assign_uids(ds: Dataset, study_key: str, instance_key: str) -> Dataset:
    """Give ``ds`` study, series and instance UIDs derived from the keys."""
    ds.StudyInstanceUID = deterministic_uid("study", study_key)
    ds.SeriesInstanceUID = deterministic_uid("series", study_key, ds.ImageLaterality, ds.ViewPosition)
    ds.SOPInstanceUID = deterministic_uid("instance", study_key, instance_key)
    ds.FrameOfReferenceUID = deterministic_uid("frame", study_key)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def four_view_study(study_key: str, downscale: int = 4) -> list[Dataset]:
    """The four standard views of one test study, from real GE headers and mini-MIAS films."""
    datasets = dicom_factory.make_study(dicom_factory.DEFAULT_FOUR_VIEWS, study_key, downscale=downscale)
    return [assign_uids(ds, study_key, f"{ds.ImageLaterality}{ds.ViewPosition}") for ds in datasets]


def single_view(key: str, bits_stored: int = 12, downscale: int = 4, header: str = dicom_factory.GE_FOR_PRESENTATION) -> Dataset:
    pixels = dicom_factory.to_bits(dicom_factory.load_mias(4)[::downscale, ::downscale], bits_stored)
    ds = dicom_factory.make_mammogram(pixels, "L", "MLO", study_key=key, bits_stored=bits_stored, header=header)
    # Elements the factory adds with the ambiguous VR "US or SS" (Pixel Padding Value in the
    # For Processing header) cannot be encoded; unsigned pixels make them US.
    for element in ds.iterall():
        if element.VR == "US or SS":
            element.VR = "US"
    return assign_uids(ds, key, "LMLO")


@functools.cache
def dcmtk(name: str) -> str:
    """Path of a DCMTK tool; other programs of the same name (pynetdicom's apps) are skipped."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder) / name
        if not os.access(candidate, os.X_OK):
            continue
        # DCMTK tools are compiled programs; scripts (such as pyenv shims) are other tools.
        with candidate.open("rb") as stream:
            if stream.read(2) == b"#!":
                continue
        result = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
        if "dcmtk" in result.stdout.lower():
            return str(candidate)
    raise FileNotFoundError(f"DCMTK tool {name!r} not found on PATH; install DCMTK (apt-get install dcmtk)")


def echo(port: int, calling_ae_title: str = "TESTSCU", called_ae_title: str = "MAMMOVAE") -> int | None:
    """C-ECHO status, or None when no association was established."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def send(port: int, items: Sequence[Dataset | Path], transfer_syntax: str | None = None, calling_ae_title: str = "TESTSCU") -> list[int | None]:
    """C-STORE each dataset or Part 10 file over one association; return the statuses.

    A file is sent as its encoded bytes, in its own transfer syntax, without re-encoding.
    """
    # pynetdicom sends a file's dataset bytes unchanged only in chunked mode. Otherwise it
    # decodes the file first, which fails for the deliberately broken test files.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling_ae_title)
    contexts = set()
    for item in items:
        if isinstance(item, Dataset):
            sop_class, syntax = item.SOPClassUID, transfer_syntax or item.file_meta.TransferSyntaxUID
        else:
            meta = read_file_meta_info(item)
            sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
        contexts.add((str(sop_class), str(syntax)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMOVAE")
    if not assoc.is_established:
        raise ConnectionError(f"association with 127.0.0.1:{port} was not established")
    statuses = []
    try:
        for item in items:
            status = assoc.send_c_store(item if isinstance(item, Dataset) else str(item))
            statuses.append(int(status.Status) if status else None)
    finally:
        assoc.release()
    return statuses


def wait_for_results(data_dir: Path, count: int, timeout: float = 30.0, study: str | None = None) -> list[ViewResult]:
    """Wait until ``count`` view results (of ``study`` when given) are in the database."""
    deadline = time.monotonic() + timeout
    engine, session_factory = open_database(data_dir / "results.sqlite")
    try:
        while True:
            with session_factory() as session:
                statement = select(ViewResult).order_by(ViewResult.id)
                if study:
                    statement = statement.where(ViewResult.study_instance_uid == study)
                results = list(session.scalars(statement))
            if len(results) >= count or time.monotonic() > deadline:
                return results
            time.sleep(0.1)
    finally:
        engine.dispose()


def wait_for_view(data_dir: Path, sop_instance_uid: str, timeout: float = 30.0) -> ViewResult:
    """Wait for the (first) view result of ``sop_instance_uid``."""
    deadline = time.monotonic() + timeout
    engine, session_factory = open_database(data_dir / "results.sqlite")
    try:
        while True:
            with session_factory() as session:
                result = session.scalar(
                    select(ViewResult).where(ViewResult.sop_instance_uid == sop_instance_uid).order_by(ViewResult.id).limit(1)
                )
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no view result for SOP Instance UID {sop_instance_uid} within {timeout} s")
            time.sleep(0.1)
    finally:
        engine.dispose()


def wait_for_study(data_dir: Path, study: str, state: str = "complete", timeout: float = 30.0) -> Study | None:
    deadline = time.monotonic() + timeout
    engine, session_factory = open_database(data_dir / "results.sqlite")
    try:
        while True:
            with session_factory() as session:
                row = session.get(Study, study)
            if (row is not None and row.state == state) or time.monotonic() > deadline:
                return row
            time.sleep(0.1)
    finally:
        engine.dispose()


def instances(data_dir: Path) -> list[Instance]:
    engine, session_factory = open_database(data_dir / "results.sqlite")
    try:
        with session_factory() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))
    finally:
        engine.dispose()


class WorkerProcess:
    """``python -m worker.serve`` as a subprocess, with its log in a file."""

    def __init__(self, data_dir: Path, port: int, checkpoint: Path | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log_path = data_dir.parent / f"{data_dir.name}-worker-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "worker.serve", "--data-dir", str(data_dir), "--port", str(port), *args]
        if checkpoint is not None:
            command += ["--checkpoint", str(checkpoint)]
        environment = {key: value for key, value in os.environ.items() if not key.startswith("MAMMO_WORKER_")}
        environment.update(env or {})
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until a C-ECHO to the worker returns Success."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with status {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                if echo(self.port) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"worker did not answer C-ECHO within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` (SIGTERM or SIGINT) and return the exit status."""
        self.process.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> int:
        self.process.kill()
        return self.wait(30.0)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def run_results_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.results", "--data-dir", str(data_dir), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

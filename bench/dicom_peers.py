"""The worker and DCMTK storescp as subprocesses on 127.0.0.1, and DCMTK storescu sending to them."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from bench.machine import dcmtk_tool
from bench.profiling import REPO_ROOT

logger = logging.getLogger(__name__)

WORKER_AE_TITLE = "MAMMOVAE"
STORESCP_AE_TITLE = "STORESCP"
STARTUP_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until ``process`` accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def wait_for_worker(port: int, process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the worker logs that it listens, then check it with a C-ECHO.

    A bare TCP probe would leave the worker with an association that waits for its
    A-ASSOCIATE request until the ACSE timeout, which also delays the worker's shutdown.
    """
    deadline = time.monotonic() + timeout
    while "Listening as" not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with status {process.returncode} at start-up; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not listen within {timeout:.0f} s; see {log}")
        time.sleep(0.1)
    if not echo(port, WORKER_AE_TITLE):
        raise RuntimeError(f"C-ECHO to the worker on 127.0.0.1:{port} failed; see {log}")


def echo(port: int, ae_title: str) -> bool:
    """True when a C-ECHO to ``ae_title`` on 127.0.0.1:``port`` succeeds."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return bool(status) and status.Status == 0


def stop_process(process: subprocess.Popen, timeout: float = 60.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Receiver:
    name: str
    ae_title: str
    port: int
    process: subprocess.Popen | None  # None for a worker running in this process
    folder: Path
    log: Path | None = None
    ready: bool = True

    def wait_ready(self) -> None:
        """Wait until a worker started with ``start_worker(..., wait=False)`` listens."""
        if not self.ready and self.process is not None and self.log is not None:
            wait_for_worker(self.port, self.process, self.log)
        self.ready = True

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def start_storescp(folder: Path) -> Receiver:
    """Start DCMTK storescp accepting every transfer syntax it supports (+xa), writing each file under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (folder.parent / f"{folder.name}.log").open("w")
    process = subprocess.Popen(
        [dcmtk_tool("storescp"), "+xa", "--output-directory", str(folder), "--aetitle", STORESCP_AE_TITLE, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, process)
    return Receiver("DCMTK storescp", STORESCP_AE_TITLE, port, process, folder)


def start_worker(data_dir: Path, checkpoint: Path, workers: int = 2, wait: bool = True) -> Receiver:
    """Start ``python -m worker.serve`` with the shipped config, this data directory and checkpoint.

    With ``wait`` False the worker starts in the background; call ``wait_ready`` before use.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}.log"
    log = log_path.open("w")
    environment = dict(os.environ, MAMMO_WORKER_STORAGE_FREE_DISK_FLOOR_MB="1")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "worker.serve",
            "--data-dir", str(data_dir),
            "--port", str(port),
            "--checkpoint", str(checkpoint),
            "--workers", str(workers),
        ],
        cwd=REPO_ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    receiver = Receiver("worker", WORKER_AE_TITLE, port, process, data_dir, log_path, ready=False)
    if wait:
        receiver.wait_ready()
    return receiver


def storescu(receiver: Receiver, paths: list[Path], jpeg2000: bool) -> float:
    """Send ``paths`` over one association with DCMTK storescu; return the client's wall time in s."""
    options = ["--propose-j2k-lossless"] if jpeg2000 else []
    command = [dcmtk_tool("storescu"), *options, "--call", receiver.ae_title, "127.0.0.1", str(receiver.port), *map(str, paths)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {receiver.name} failed with status {result.returncode}: {result.stderr.strip()[-500:]}")
    return elapsed


def database(receiver: Receiver) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{receiver.folder / 'results.sqlite'}?mode=ro", uri=True, timeout=30)


def pending_instances(receiver: Receiver) -> int:
    with database(receiver) as connection:
        (count,) = connection.execute("SELECT COUNT(*) FROM instances WHERE state IN ('queued', 'processing')").fetchone()
    return int(count)


def wait_until_idle(receiver: Receiver, timeout: float = IDLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while pending_instances(receiver):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker still had queued instances after {timeout:.0f} s")
        time.sleep(0.05)


def study_complete(receiver: Receiver, study_instance_uid: str, views: int) -> bool:
    """True when the study's summary is complete and every view's SC path is committed."""
    with database(receiver) as connection:
        state = connection.execute(
            "SELECT state FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)
        ).fetchone()
        (exported,) = connection.execute(
            "SELECT COUNT(*) FROM view_results WHERE study_instance_uid = ? AND sc_path IS NOT NULL",
            (study_instance_uid,),
        ).fetchone()
    return state is not None and state[0] == "complete" and exported >= views


def view_timings(receiver: Receiver, study_instance_uid: str) -> list[dict[str, object]]:
    with database(receiver) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute(
            "SELECT status, decode_ms, preprocess_ms, inference_ms, export_ms, database_ms, warnings "
            "FROM view_results WHERE study_instance_uid = ?",
            (study_instance_uid,),
        ).fetchall()
    return [dict(row) for row in rows]


def peak_rss_bytes(process: subprocess.Popen) -> int:
    """VmHWM (peak resident set size) of a running process, from /proc/PID/status."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM line in /proc/{process.pid}/status")


def copy_study(paths: list[Path], folder: Path, key: str) -> tuple[str, list[Path]]:
    """Write the study again with new Study, Series and SOP Instance UIDs derived from ``key``.

    The worker stores content it has seen before only once, so every send needs new UIDs.
    """
    from bench.images import dicom_factory

    derived_uid = dicom_factory().derived_uid
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = derived_uid("bench study", key)
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        view = f"{ds.ImageLaterality}{ds.ViewPosition}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = derived_uid("bench series", key, view)
        ds.SOPInstanceUID = derived_uid("bench instance", key, view)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = folder / f"{key}-{view}.dcm"
        ds.save_as(target, enforce_file_format=True)
        copies.append(target)
    return study_uid, copies

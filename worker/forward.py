"""Forwarding of Secondary Captures to the configured destination with C-STORE.

The queue is the ``export_jobs`` table: a job is ``pending`` until it is sent, or ``dead``
after ``max_attempts`` failed attempts. Because the state lives in the database, a restart
resumes where the last run stopped. One Forwarder thread sends the jobs of one destination.

NOTE: a lock keeps passes apart within one process only. Two worker processes on the same
database would send the same due jobs twice (the peer receives the same SOP Instance again).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import ExportJob, utcnow

logger = logging.getLogger(__name__)

# Jobs sent over one association in one pass. A longer queue takes several passes.
MAX_JOBS_PER_PASS = 50
POLL_INTERVAL_S = 5.0
CONNECTION_TIMEOUT_S = 10.0
ACSE_TIMEOUT_S = 30.0
DIMSE_TIMEOUT_S = 60.0
NETWORK_TIMEOUT_S = 60.0

_AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_DESTINATION_PATTERN = re.compile(r"^(?P<ae>[^@]+)@(?P<host>[^:@]+):(?P<port>[0-9]+)$")


def check_ae_title(value: str, name: str = "AE title") -> str:
    """Return ``value`` if it is a valid AE title (1 to 16 printable ASCII, no backslash)."""
    if not isinstance(value, str) or not _AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError(f"{name} {value!r} is invalid: expected 1 to 16 printable ASCII characters without '\\'")
    return value


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP: AE title, host and TCP port. ``str()`` gives ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "destination AE title")
        if not self.host or any(char.isspace() for char in self.host) or "@" in self.host:
            raise ValueError(f"destination host {self.host!r} is invalid: expected a host name or IP address")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"destination port {self.port!r} is invalid: expected an integer from 1 to 65535")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``"AE@host:port"``, for example ``"PACS@10.0.0.5:104"``."""
        match = _DESTINATION_PATTERN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"destination {text!r} is invalid: expected AE@host:port, for example PACS@10.0.0.5:104")
        return cls(match["ae"], match["host"], int(match["port"]))


def backoff_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failure: doubling from ``initial_s``, capped."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    # min() before the power would overflow for a long series of failures.
    exponent = min(attempts - 1, 64)
    return min(initial_s * 2.0**exponent, max_s)


def enqueue_export(
    session: Session, view_result_id: int, sc_sop_instance_uid: str, sc_path: str, destination: str
) -> ExportJob:
    """Add the export job of a view result, or return the existing one for that destination.

    An existing job for another Secondary Capture (a rescored view) is pointed at the new
    one and made pending again. The job is flushed, and the caller commits the session.
    """
    destination = str(Destination.parse(destination))
    job = session.scalars(
        select(ExportJob).where(ExportJob.view_result_id == view_result_id, ExportJob.destination == destination)
    ).first()
    if job is None:
        job = ExportJob(
            view_result_id=view_result_id,
            sc_sop_instance_uid=sc_sop_instance_uid,
            sc_path=sc_path,
            destination=destination,
            state="pending",
            attempts=0,
            next_attempt_at=utcnow(),
        )
        session.add(job)
    elif job.sc_sop_instance_uid != sc_sop_instance_uid or job.sc_path != sc_path:
        logger.info(
            "export job %s now sends %s instead of %s to %s",
            job.id,
            sc_sop_instance_uid,
            job.sc_sop_instance_uid,
            destination,
        )
        job.sc_sop_instance_uid = sc_sop_instance_uid
        job.sc_path = sc_path
        job.state = "pending"
        job.attempts = 0
        job.next_attempt_at = utcnow()
        job.last_error = None
    session.flush()
    return job


def retry_dead(session: Session, job_ids: list[int] | None = None) -> int:
    """Put dead jobs (all, or those in ``job_ids``) back to pending with no attempts counted.

    Returns the number of jobs changed. ``last_error`` is kept until the next attempt. The
    caller commits the session.
    """
    query = select(ExportJob).where(ExportJob.state == "dead")
    if job_ids is not None:
        query = query.where(ExportJob.id.in_(job_ids))
    now = utcnow()
    jobs = list(session.scalars(query))
    for job in jobs:
        job.state = "pending"
        job.attempts = 0
        job.next_attempt_at = now
    session.flush()
    if jobs:
        logger.info("%d dead export jobs are pending again", len(jobs))
    return len(jobs)


@dataclass(frozen=True)
class _DueJob:
    id: int
    sop_instance_uid: str
    path: Path


class Forwarder:
    """Background thread that sends the due pending jobs of one destination with C-STORE."""

    def __init__(
        self,
        sessionmaker: Callable[[], Session],
        data_dir: Path,
        destination: Destination,
        calling_ae_title: str,
        max_attempts: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        if not isinstance(destination, Destination):
            raise TypeError(f"destination must be a Destination, got {type(destination).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if not backoff_initial_s > 0:
            raise ValueError(f"backoff_initial_s must be positive, got {backoff_initial_s}")
        if not backoff_max_s >= backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({backoff_max_s}) must be at least backoff_initial_s ({backoff_initial_s})"
            )
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.sessionmaker = sessionmaker
        self.data_dir = Path(data_dir)
        self.destination = destination
        self.calling_ae_title = check_ae_title(calling_ae_title, "calling AE title")
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.poll_interval_s = poll_interval_s
        self._wake_event = threading.Event()
        self._stop_event = threading.Event()
        self._pass_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the sending thread; it first sends every job that is already due."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"the forwarder to {self.destination} is already running")
        self._log_other_destinations()
        self._stop_event.clear()
        self._wake_event.set()
        self._thread = threading.Thread(target=self._run, name=f"forwarder-{self.destination}", daemon=True)
        self._thread.start()
        logger.info("forwarder to %s started", self.destination)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the job in progress, waiting at most ``timeout`` seconds."""
        self._stop_event.set()
        self._wake_event.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "forwarder to %s did not stop within %.1f s; it stops after the C-STORE in progress",
                self.destination,
                timeout,
            )
            return
        self._thread = None
        logger.info("forwarder to %s stopped", self.destination)

    def wake(self) -> None:
        """Look for due jobs now instead of at the next poll."""
        self._wake_event.set()

    def _run(self) -> None:
        while not self._stop_event.is_set():
            self._wake_event.clear()
            try:
                attempted, _ = self._pass(self._stop_event)
            except Exception:
                # A database error must not end the thread: log it and poll again later.
                logger.exception("forwarding pass to %s failed", self.destination)
                attempted = 0
            if attempted >= MAX_JOBS_PER_PASS:
                continue
            self._wake_event.wait(self._seconds_until_next_due())

    def _seconds_until_next_due(self) -> float:
        try:
            with self.sessionmaker() as session:
                next_due = session.scalars(
                    select(ExportJob.next_attempt_at)
                    .where(ExportJob.state == "pending", ExportJob.destination == str(self.destination))
                    .order_by(ExportJob.next_attempt_at)
                    .limit(1)
                ).first()
        except Exception:
            logger.exception("reading the export queue for %s failed", self.destination)
            return self.poll_interval_s
        if next_due is None:
            return self.poll_interval_s
        return min(max((next_due - utcnow()).total_seconds(), 0.0), self.poll_interval_s)

    def _log_other_destinations(self) -> None:
        with self.sessionmaker() as session:
            others = session.scalars(
                select(ExportJob.destination).where(
                    ExportJob.state == "pending", ExportJob.destination != str(self.destination)
                )
            ).all()
        for destination in sorted(set(others)):
            logger.warning(
                "%d pending export jobs are for %s, not the configured destination %s; they are not sent",
                others.count(destination),
                destination,
                self.destination,
            )

    # --- one pass ---------------------------------------------------------------------

    def run_once(self) -> int:
        """Send the jobs that are due now over one association; return how many were sent."""
        _, sent = self._pass(None)
        return sent

    def _pass(self, stop_event: threading.Event | None) -> tuple[int, int]:
        """Returns the numbers of jobs attempted and sent. A set ``stop_event`` ends the pass
        before the next C-STORE."""
        with self._pass_lock:
            due = self._load_due_jobs()
            if not due:
                return 0, 0
            return self._send(due, stop_event)

    def _load_due_jobs(self) -> list[_DueJob]:
        with self.sessionmaker() as session:
            jobs = session.scalars(
                select(ExportJob)
                .where(
                    ExportJob.state == "pending",
                    ExportJob.destination == str(self.destination),
                    ExportJob.next_attempt_at <= utcnow(),
                )
                .order_by(ExportJob.next_attempt_at, ExportJob.id)
                .limit(MAX_JOBS_PER_PASS)
            ).all()
            return [_DueJob(job.id, job.sc_sop_instance_uid, self.data_dir / job.sc_path) for job in jobs]

    def _send(self, due: list[_DueJob], stop_event: threading.Event | None) -> tuple[int, int]:
        contexts: dict[tuple[str, str], None] = {}
        ready: list[_DueJob] = []
        for job in due:
            try:
                contexts[read_context(job)] = None
            except (OSError, ValueError) as err:
                self._record_failure(job, str(err))
                continue
            ready.append(job)
        attempted = len(due) - len(ready)
        if not ready:
            return attempted, 0

        assoc, connected = self._associate([build_context(sop_class, syntax) for sop_class, syntax in contexts])
        if not assoc.is_established:
            error = describe_association_failure(assoc, connected)
            # One line for the whole pass, because every job fails for the same reason.
            logger.warning("association with %s failed, %d export jobs not sent: %s", self.destination, len(ready), error)
            for job in ready:
                self._record_failure(job, error, log_retry=False)
            return attempted + len(ready), 0

        sent = 0
        try:
            for job in ready:
                if stop_event is not None and stop_event.is_set():
                    break
                attempted += 1
                if not assoc.is_established:
                    self._record_failure(job, "association aborted before this C-STORE")
                    continue
                error = self._store(assoc, job)
                if error is None:
                    sent += 1
                    self._record_success(job)
                else:
                    self._record_failure(job, error)
        finally:
            if assoc.is_established:
                assoc.release()
        return attempted, sent

    def _associate(self, contexts: list) -> tuple[Association, bool]:
        """Request an association; the flag is True when the TCP connection was opened."""
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = CONNECTION_TIMEOUT_S
        ae.acse_timeout = ACSE_TIMEOUT_S
        ae.dimse_timeout = DIMSE_TIMEOUT_S
        ae.network_timeout = NETWORK_TIMEOUT_S
        opened: list[bool] = []
        assoc = ae.associate(
            self.destination.host,
            self.destination.port,
            contexts=contexts,
            ae_title=self.destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(True))],
        )
        return assoc, bool(opened)

    def _store(self, assoc: Association, job: _DueJob) -> str | None:
        """Send one file; return None on success, else the reason it failed."""
        try:
            status = assoc.send_c_store(job.path)
        except (OSError, ValueError) as err:
            # pynetdicom raises ValueError when no accepted context fits the file.
            return f"C-STORE of {job.sop_instance_uid} not sent: {err}"
        if "Status" not in status:
            return (
                f"no C-STORE response for {job.sop_instance_uid} "
                f"(association aborted, or no reply within {DIMSE_TIMEOUT_S:g} s)"
            )
        code = int(status.Status)
        category = code_to_category(code)
        if category == "Success":
            return None
        if category == "Warning":
            # A warning (such as 0xB000, coercion of data elements) means the peer stored it.
            logger.warning(
                "%s stored %s with warning status %s", self.destination, job.sop_instance_uid, describe_status(status)
            )
            return None
        return f"C-STORE of {job.sop_instance_uid} failed with status {describe_status(status)}"

    # --- bookkeeping ------------------------------------------------------------------

    def _record_success(self, job: _DueJob) -> None:
        with self.sessionmaker() as session, session.begin():
            row = session.get(ExportJob, job.id)
            if row is None:
                return
            row.state = "sent"
            row.attempts += 1
            row.last_error = None
        logger.info("sent %s to %s (export job %d)", job.sop_instance_uid, self.destination, job.id)

    def _record_failure(self, job: _DueJob, error: str, log_retry: bool = True) -> None:
        """Count a failed attempt and schedule the next one, or mark the job dead.

        A dead job is logged at ERROR. A scheduled retry is logged at WARNING if ``log_retry``.
        """
        message = f"{self.destination}: {error}"
        delay = 0.0
        with self.sessionmaker() as session, session.begin():
            row = session.get(ExportJob, job.id)
            if row is None or row.state != "pending":
                return
            row.attempts += 1
            row.last_error = message
            attempts = row.attempts
            if attempts >= self.max_attempts:
                row.state = "dead"
            else:
                delay = backoff_delay(attempts, self.backoff_initial_s, self.backoff_max_s)
                row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
        if attempts >= self.max_attempts:
            logger.error(
                "export job %d (%s) is dead after %d attempts: %s",
                job.id,
                job.sop_instance_uid,
                attempts,
                message,
            )
        elif log_retry:
            logger.warning(
                "export job %d (%s) attempt %d of %d failed, retrying in %.3g s: %s",
                job.id,
                job.sop_instance_uid,
                attempts,
                self.max_attempts,
                delay,
                message,
            )


def read_context(job: _DueJob) -> tuple[str, str]:
    """(SOP Class UID, Transfer Syntax UID) of a job's file, after checking its SOP Instance UID."""
    try:
        meta = pydicom.dcmread(job.path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
    except FileNotFoundError as err:
        raise OSError(f"file {str(job.path)!r} of {job.sop_instance_uid} not found") from err
    except pydicom.errors.InvalidDicomError as err:
        raise ValueError(f"file {str(job.path)!r} is not a DICOM file: {err}") from err
    sop_class = meta.get("MediaStorageSOPClassUID")
    syntax = meta.get("TransferSyntaxUID")
    instance = meta.get("MediaStorageSOPInstanceUID")
    if not sop_class or not syntax:
        raise ValueError(f"file {str(job.path)!r} has no SOP Class or Transfer Syntax UID in its file meta")
    if instance != job.sop_instance_uid:
        raise ValueError(f"file {str(job.path)!r} contains SOP Instance {instance}, expected {job.sop_instance_uid}")
    return str(sop_class), str(syntax)


def describe_status(status: pydicom.Dataset) -> str:
    """Format a C-STORE status as its code, meaning and Error Comment, such as
    ``0xA700 (Refused: Out of Resources)``."""
    code = int(status.Status)
    details = [STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))[1], status.get("ErrorComment")]
    text = ", ".join(str(detail) for detail in details if detail)
    return f"0x{code:04X} ({text})" if text else f"0x{code:04X}"


def describe_association_failure(assoc: Association, connected: bool) -> str:
    if not connected:
        return (
            "could not open a TCP connection (refused, unreachable, "
            f"or no answer within {CONNECTION_TIMEOUT_S:g} s)"
        )
    if assoc.is_rejected:
        reply = assoc.acceptor.primitive
        return f"association rejected ({reply.result_str}, {reply.source_str}: {reply.reason_str})"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        offered = ", ".join(
            f"{context.abstract_syntax.name} in {', '.join(str(s) for s in context.transfer_syntax)}"
            for context in assoc.rejected_contexts
        )
        return f"association aborted: no presentation context accepted ({offered})"
    return f"association aborted by the peer, or no association response within {ACSE_TIMEOUT_S:g} s"

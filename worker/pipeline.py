"""The processing pool: spooled instances to view results, Secondary Captures and export jobs.

Threads of the pool claim queued Instance rows (queued -> processing), read the spooled
file, check and preprocess it with ``model.preprocess``, score it with ``model.scoring``,
write the Secondary Capture of a scored view, and commit the ViewResult, the study
summary and the export job together with the instance's ``done`` state. Views are
preprocessed at the scorer's ``view_size`` (512 pixels for a patch checkpoint). For a
pairwise score, ``worker.pairs`` judges a view once the other breast's same view is scored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from model.dicom_pixels import MIN_REDUCED_SIDE, reduced_decoding
from model.preprocess import (
    OUTPUT_SIZE,
    PreprocessedView,
    PreprocessingError,
    UnsupportedView,
    check_scorable,
    preprocess_dataset,
)
from model.scoring import Scorer, ViewScore
from worker import export, forward, pairs, studies
from worker.db import Instance, Study, ViewResult, utcnow


try:
    from threadpoolctl import threadpool_limits
except ImportError:  # NOTE: without threadpoolctl OpenBLAS keeps one thread per core.
    threadpool_limits = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

EXPORTS_DIRNAME = "exports"


@dataclass
class ProcessingContext:
    """Dependencies of the processing threads besides the database."""

    data_dir: Path
    scorer: Scorer
    uid_root: str | None = None
    quiet_period_s: float = 30.0
    max_attempts: int = 3
    # "AE@host:port" of the forwarding destination, or None when forwarding is off.
    destination: str | None = None
    # Called after export jobs were committed, to wake the forwarder.
    on_export_queued: Callable[[], None] = lambda: None
    # Longest side, in pixels, of a reduced-resolution decode of a large view
    # (model.dicom_pixels.reduced_decoding) for 128-pixel views, scaled with the scorer's
    # view size; None decodes every view in full.
    decode_min_side: int | None = MIN_REDUCED_SIDE

    @property
    def scaled_decode_min_side(self) -> int | None:
        if self.decode_min_side is None:
            return None
        return -(-self.decode_min_side * self.scorer.view_size // OUTPUT_SIZE)

    @property
    def model_name(self) -> str:
        return f"latent{self.scorer.checkpoint.model_config.latent_size}"


@dataclass
class Outcome:
    """The result of processing one instance, before it is written to the database."""

    status: str
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    laterality: str | None = None
    view_position: str | None = None
    score: ViewScore | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sc_sop_instance_uid: str | None = None
    sc_path: str | None = None


def recover_interrupted(session_factory: sessionmaker) -> int:
    """Put instances left ``processing`` by an earlier run back to ``queued``; return how many."""
    with session_factory() as session:
        result = session.execute(update(Instance).where(Instance.state == "processing").values(state="queued"))
        session.commit()
        queued = session.scalar(select(Instance.id).where(Instance.state == "queued").limit(1))
    recovered = result.rowcount or 0
    if recovered:
        logger.warning("Requeued %d instances whose processing was interrupted by an earlier run", recovered)
    if queued is not None:
        logger.info("Resuming queued instances left by an earlier run")
    return recovered


def claim_next(session_factory: sessionmaker) -> int | None:
    """Move the oldest queued instance to ``processing`` and return its id, or None."""
    with session_factory() as session:
        while True:
            instance_id = session.scalar(
                select(Instance.id).where(Instance.state == "queued").order_by(Instance.id).limit(1)
            )
            if instance_id is None:
                return None
            claimed = session.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.state == "queued")
                .values(state="processing", attempts=Instance.attempts + 1)
            )
            session.commit()
            if claimed.rowcount == 1:
                return instance_id


def read_header_fields(ds: pydicom.Dataset) -> tuple[str | None, str | None]:
    laterality = ds.get("ImageLaterality") or ds.get("Laterality")
    view_position = ds.get("ViewPosition")
    return (str(laterality) if laterality else None, str(view_position) if view_position else None)


def evaluate(instance: Instance, context: ProcessingContext) -> tuple[Outcome, pydicom.Dataset | None, PreprocessedView | None]:
    """Read, check, preprocess and score one spooled instance.

    Errors become a ``failed`` or ``unsupported`` outcome instead of an exception.
    """
    outcome = Outcome(status="failed")
    path = context.data_dir / instance.path
    try:
        # Pixel Data stays on disk until preprocessing reads it, so an object rejected by
        # its header (a tomosynthesis volume, say) is never read whole.
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except Exception as err:  # noqa: BLE001 - any read failure makes this one instance fail
        outcome.reason = f"spooled file {instance.path} could not be read: {type(err).__name__}: {err}"
        logger.error("SOP Instance UID %s: %s", instance.sop_instance_uid, outcome.reason)
        return outcome, None, None
    outcome.laterality, outcome.view_position = read_header_fields(ds)

    try:
        check_scorable(ds)
        view = preprocess_view(ds, outcome.timings, context.scaled_decode_min_side, context.scorer.view_size)
    except UnsupportedView as err:
        outcome.status, outcome.reason = "unsupported", str(err)
        return outcome, ds, None
    except PreprocessingError as err:
        outcome.reason = str(err)
        logger.error("SOP Instance UID %s could not be preprocessed: %s", instance.sop_instance_uid, err)
        return outcome, ds, None
    except Exception as err:  # noqa: BLE001 - an unexpected error fails this instance, not the pool
        outcome.reason = f"{type(err).__name__}: {err}"
        logger.error(
            "SOP Instance UID %s failed in preprocessing:\n%s", instance.sop_instance_uid, traceback.format_exc()
        )
        return outcome, ds, None
    outcome.laterality = view.metadata.laterality or outcome.laterality
    outcome.view_position = view.metadata.view_position or outcome.view_position
    outcome.warnings.extend(view.metadata.warnings)

    started = time.perf_counter()
    try:
        outcome.score = context.scorer.score(view.image, view.metadata.laterality, view.metadata.view_position)
    except Exception as err:  # noqa: BLE001 - an unexpected error fails this instance, not the pool
        outcome.reason = f"{type(err).__name__}: {err}"
        logger.error("SOP Instance UID %s failed in scoring:\n%s", instance.sop_instance_uid, traceback.format_exc())
        return outcome, ds, view
    outcome.timings["inference_ms"] = (time.perf_counter() - started) * 1000.0
    outcome.status = "scored"
    return outcome, ds, view


def preprocess_view(
    ds: pydicom.Dataset, timings: dict[str, float], decode_min_side: int | None, size: int = OUTPUT_SIZE
) -> PreprocessedView:
    """Preprocess ``ds`` to ``size`` pixels, decoding a large image at reduced resolution unless ``decode_min_side`` is None.

    The crop box and source shape of the result are in stored pixels either way. The
    decode path of a reduced decode, or the reason a large image was decoded in full,
    is added to the view's warnings so that the result row records it.
    """
    if decode_min_side is None:
        return preprocess_dataset(ds, size=size, timings=timings)
    with reduced_decoding(decode_min_side) as decoding:
        view = preprocess_dataset(ds, size=size, timings=timings)
    note = decoding.note()
    if note is None:
        return view
    metadata = dataclasses.replace(
        view.metadata,
        crop_box=decoding.source_box(view.metadata.crop_box),
        source_shape=decoding.source_shape or view.metadata.source_shape,
        warnings=(*view.metadata.warnings, note),
    )
    return PreprocessedView(view.image, metadata)


def limit_blas_threads() -> None:
    """Let OpenBLAS use one thread in this process.

    The processing threads run small matrix products (the area-averaging resize); with
    one OpenBLAS thread per core these wait on each other and on the other processing
    thread, which made a 128 x 512 resize take 20 to 50 ms instead of 2 ms on a loaded
    2-core machine.
    """
    if threadpool_limits is not None:
        threadpool_limits(limits=1, user_api="blas")


def export_view(
    instance: Instance, ds: pydicom.Dataset, view: PreprocessedView, outcome: Outcome, context: ProcessingContext
) -> None:
    """Write the Secondary Capture of a scored view; a failure becomes a warning on the result."""
    if outcome.score is None:
        return
    started = time.perf_counter()
    scorer = context.scorer
    try:
        sc = export.build_secondary_capture(
            ds,
            view,
            outcome.score,
            model_version=scorer.model_version,
            model_name=context.model_name,
            preprocessing_version=scorer.preprocessing_version,
            uid_root=context.uid_root,
            pairwise_score=scorer.definition.name if scorer.pairwise else None,
        )
        if instance.conflicts_with_id is not None:
            # The UIDs derive from the source SOP Instance UID, which this instance shares
            # with another of other content, so the content hash is added to keep them apart.
            _, sop_uid = export.secondary_capture_uids(
                instance.sop_instance_uid,
                f"{scorer.model_version}/{instance.sha256[:16]}",
                context.uid_root,
                preprocessing_version=scorer.preprocessing_version,
            )
            sc.SOPInstanceUID = sop_uid
            sc.file_meta.MediaStorageSOPInstanceUID = sop_uid
        path = export.write_secondary_capture(sc, context.data_dir / EXPORTS_DIRNAME)
    except Exception as err:  # noqa: BLE001 - the score stands even when its export fails
        outcome.warnings.append(f"Secondary Capture export failed: {type(err).__name__}: {err}")
        logger.error(
            "Secondary Capture of SOP Instance UID %s failed:\n%s", instance.sop_instance_uid, traceback.format_exc()
        )
        return
    outcome.sc_sop_instance_uid = str(sc.SOPInstanceUID)
    outcome.sc_path = path.resolve().relative_to(context.data_dir.resolve()).as_posix()
    outcome.timings["export_ms"] = (time.perf_counter() - started) * 1000.0


def conflict_warning(instance: Instance) -> str | None:
    if instance.conflicts_with_id is None:
        return None
    return (
        f"SOP Instance UID {instance.sop_instance_uid} was received before with other content "
        f"(instance {instance.conflicts_with_id}); both were kept and scored separately"
    )


def write_result(session: Session, instance: Instance, outcome: Outcome, context: ProcessingContext) -> ViewResult:
    """Add or update the instance's ViewResult, mark the instance done, and queue its export."""
    result = session.scalar(select(ViewResult).where(ViewResult.instance_id == instance.id))
    if result is None:
        result = ViewResult(instance_id=instance.id)
        session.add(result)
    score = outcome.score
    result.study_instance_uid = instance.study_instance_uid
    result.series_instance_uid = instance.series_instance_uid
    result.sop_instance_uid = instance.sop_instance_uid
    result.laterality = outcome.laterality
    result.view_position = outcome.view_position
    result.status = outcome.status
    result.reason = outcome.reason
    result.warnings = "\n".join(outcome.warnings) or None
    result.score_name = context.scorer.definition.name
    result.reconstruction_error = score.reconstruction_error if score else None
    result.global_error = float(np.mean(score.error_map)) if score else None
    result.z_score = score.z_score if score else None
    result.threshold = score.threshold if score else None
    result.anomalous = score.anomalous if score else None
    result.calibration_group = score.calibration_group if score else None
    result.model_version = context.scorer.model_version
    result.preprocessing_version = context.scorer.preprocessing_version
    result.decode_ms = outcome.timings.get("decode_ms")
    result.preprocess_ms = outcome.timings.get("preprocess_ms")
    result.inference_ms = outcome.timings.get("inference_ms")
    result.export_ms = outcome.timings.get("export_ms")
    result.sc_sop_instance_uid = outcome.sc_sop_instance_uid
    result.sc_path = outcome.sc_path
    instance.state = "done"
    session.flush()
    if score is not None and context.scorer.pairwise:
        pairs.judge_with_partner(session, result, context.scorer)
        session.flush()

    if outcome.sc_path and context.destination:
        forward.enqueue_export(session, result.id, outcome.sc_sop_instance_uid, outcome.sc_path, context.destination)
    if instance.study_instance_uid:
        update_study(session, instance.study_instance_uid, context.quiet_period_s)
    return result


def update_study(session: Session, study_instance_uid: str, quiet_period_s: float) -> None:
    now = utcnow()
    study = session.get(Study, study_instance_uid)
    quiet = study is not None and now - study.last_instance_at >= dt.timedelta(seconds=quiet_period_s)
    studies.update_summary(session, study_instance_uid, now=now, quiet=quiet)


def fail_exhausted(instance: Instance, context: ProcessingContext) -> Outcome | None:
    """Return a ``failed`` outcome when the instance's processing was interrupted too often."""
    if instance.attempts <= context.max_attempts:
        return None
    return Outcome(
        status="failed",
        reason=(
            f"processing was interrupted {instance.attempts - 1} times (processing.max_attempts = "
            f"{context.max_attempts}); the instance is not retried again"
        ),
    )


def process_instance(instance_id: int, session_factory: sessionmaker, context: ProcessingContext) -> ViewResult | None:
    """Process one claimed instance and commit its result; return the result."""
    started = time.perf_counter()
    with session_factory() as session:
        instance = session.get(Instance, instance_id)
        if instance is None:
            logger.error("Claimed instance %d is no longer in the database", instance_id)
            return None
        session.expunge(instance)
    database_ms = (time.perf_counter() - started) * 1000.0

    outcome = fail_exhausted(instance, context)
    if outcome is None:
        outcome, ds, view = evaluate(instance, context)
        if outcome.status == "scored" and ds is not None and view is not None:
            export_view(instance, ds, view, outcome, context)
    warning = conflict_warning(instance)
    if warning:
        outcome.warnings.insert(0, warning)

    write_started = time.perf_counter()
    with session_factory() as session:
        instance = session.merge(instance)
        result = write_result(session, instance, outcome, context)
        # Covers reading the instance row and writing the result, but not the final commit.
        result.database_ms = database_ms + (time.perf_counter() - write_started) * 1000.0
        session.commit()
    if outcome.sc_path and context.destination:
        context.on_export_queued()

    total_ms = (time.perf_counter() - started) * 1000.0
    logger.info(
        "View %s: %s%s, z=%s, %.0f ms",
        instance.sop_instance_uid,
        outcome.status,
        f" ({outcome.reason})" if outcome.reason else "",
        studies.format_z(result.z_score),
        total_ms,
    )
    return result


class ProcessingPool:
    """Threads that process queued instances; ``wake`` makes them look for work at once."""

    def __init__(self, session_factory: sessionmaker, context: ProcessingContext, workers: int, poll_interval_s: float = 5.0) -> None:
        self.session_factory = session_factory
        self.context = context
        self.workers = workers
        self.poll_interval_s = poll_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claim_lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()

    def start(self) -> None:
        limit_blas_threads()
        for index in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"processing-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.workers == 0:
            logger.warning("processing.workers is 0: instances are received and queued but not processed")

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> list[int]:
        """Stop the threads; return ids of instances requeued because they did not finish in ``timeout`` s."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._in_flight_lock:
            unfinished = list(self._in_flight.values())
        if unfinished:
            with self.session_factory() as session:
                session.execute(
                    update(Instance)
                    .where(Instance.id.in_(unfinished), Instance.state == "processing")
                    .values(state="queued", attempts=Instance.attempts - 1)
                )
                session.commit()
            logger.warning("Requeued %d instances still processing after %.0f s: %s", len(unfinished), timeout, unfinished)
        return unfinished

    def _run(self) -> None:
        name = threading.current_thread().name
        while not self._stop.is_set():
            self._wake.clear()
            try:
                with self._claim_lock:
                    instance_id = claim_next(self.session_factory)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the thread
                logger.exception("Claiming the next queued instance failed; retrying in %.1f s", self.poll_interval_s)
                self._stop.wait(self.poll_interval_s)
                continue
            if instance_id is None:
                self._wake.wait(self.poll_interval_s)
                continue
            with self._in_flight_lock:
                self._in_flight[name] = instance_id
            try:
                process_instance(instance_id, self.session_factory, self.context)
            except Exception:  # noqa: BLE001 - one instance must not end the thread
                logger.exception("Processing instance %d failed outside the per-view error handling", instance_id)
                self._requeue(instance_id)
                self._stop.wait(self.poll_interval_s)
            finally:
                with self._in_flight_lock:
                    self._in_flight.pop(name, None)

    def _requeue(self, instance_id: int) -> None:
        """Put a failed claim back to ``queued``; processing.max_attempts bounds the retries."""
        try:
            with self.session_factory() as session:
                session.execute(
                    update(Instance).where(Instance.id == instance_id, Instance.state == "processing").values(state="queued")
                )
                session.commit()
        except Exception:  # noqa: BLE001 - the next start requeues it instead
            logger.exception("Requeueing instance %d failed; it is requeued at the next start", instance_id)

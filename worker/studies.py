"""Study summaries: which studies are complete, and their per-breast maximum z-scores.

A study is ``complete`` when all four standard views (left and right, CC and MLO) are
scored, or when no instance of it arrived for the quiet period. In both cases no instance
of the study may still wait for processing. An instance that arrives later reopens the
study, and the summary is computed again when its view is done.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worker.db import Instance, Study, ViewResult, utcnow

logger = logging.getLogger(__name__)

STANDARD_VIEWS = frozenset({("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")})
PENDING_STATES = ("queued", "processing")


def note_instance(session: Session, study_instance_uid: str, received_at: dt.datetime) -> Study:
    """Record a received instance of a study, reopening the study when it was complete."""
    study = session.get(Study, study_instance_uid)
    if study is None:
        study = Study(study_instance_uid=study_instance_uid, state="open", scored_views=0, last_instance_at=received_at)
        session.add(study)
        return study
    if study.state != "open":
        logger.info("Study %s reopened by a new instance", study_instance_uid)
    study.state = "open"
    study.completed_at = None
    study.last_instance_at = max(study.last_instance_at, received_at)
    return study


def pending_instances(session: Session, study_instance_uid: str) -> int:
    return session.scalar(
        select(func.count(Instance.id)).where(
            Instance.study_instance_uid == study_instance_uid, Instance.state.in_(PENDING_STATES)
        )
    ) or 0


def update_summary(session: Session, study_instance_uid: str, now: dt.datetime | None = None, quiet: bool = False) -> Study:
    """Recompute a study's summary from its view results; mark it complete when it is.

    ``quiet`` means the quiet period has passed, so the study completes with the views it has.
    """
    now = now or utcnow()
    study = session.get(Study, study_instance_uid)
    if study is None:
        study = Study(study_instance_uid=study_instance_uid, state="open", scored_views=0, last_instance_at=now)
        session.add(study)

    results = session.scalars(
        select(ViewResult).where(ViewResult.study_instance_uid == study_instance_uid, ViewResult.status == "scored")
    ).all()
    study.scored_views = len(results)
    study.max_z_left = max_z(results, "L")
    study.max_z_right = max_z(results, "R")
    verdicts = [result.anomalous for result in results if result.anomalous is not None]
    study.flagged = any(verdicts) if verdicts else None

    views = {(result.laterality, result.view_position) for result in results}
    has_standard_views = STANDARD_VIEWS <= views
    if study.state == "open" and (has_standard_views or quiet) and pending_instances(session, study_instance_uid) == 0:
        study.state = "complete"
        study.completed_at = now
        logger.info(
            "Study %s complete (%s): %d scored views, flagged=%s, max z left=%s right=%s",
            study_instance_uid,
            "four standard views" if has_standard_views else "quiet period",
            study.scored_views,
            study.flagged,
            format_z(study.max_z_left),
            format_z(study.max_z_right),
        )
    return study


def max_z(results: list[ViewResult], laterality: str) -> float | None:
    values = [result.z_score for result in results if result.laterality == laterality and result.z_score is not None]
    return max(values) if values else None


def format_z(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def complete_quiet_studies(session: Session, quiet_period_s: float, now: dt.datetime | None = None) -> list[str]:
    """Complete open studies with no new instance for ``quiet_period_s`` and none pending."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=quiet_period_s)
    candidates = session.scalars(
        select(Study.study_instance_uid).where(Study.state == "open", Study.last_instance_at <= cutoff)
    ).all()
    completed = []
    for uid in candidates:
        study = update_summary(session, uid, now=now, quiet=True)
        if study.state == "complete":
            completed.append(uid)
    return completed


class StudyMonitor:
    """Background thread that completes studies once their quiet period has passed."""

    def __init__(self, session_factory: sessionmaker, quiet_period_s: float, interval_s: float | None = None) -> None:
        self.session_factory = session_factory
        self.quiet_period_s = quiet_period_s
        # Check often enough that a quiet study completes within about 1.25 quiet periods.
        self.interval_s = interval_s if interval_s is not None else min(max(quiet_period_s / 4, 0.2), 5.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="study-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> list[str]:
        with self.session_factory() as session:
            completed = complete_quiet_studies(session, self.quiet_period_s)
            session.commit()
        return completed

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive a failed check
                logger.exception("Checking for quiet studies failed; retrying in %.1f s", self.interval_s)

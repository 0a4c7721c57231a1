"""Results database: received instances (the job queue), view results, studies, exports."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received SOP instance, spooled to disk. Its ``state`` makes it a job."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_content"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    # queued -> processing -> done; a restart puts processing back to queued.
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Set when an instance with the same SOP Instance UID but other content came first.
    conflicts_with_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ViewResult(Base):
    """Outcome for one instance: ``scored``, ``unsupported`` or ``failed`` (with a reason)."""

    __tablename__ = "view_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    laterality: Mapped[str | None] = mapped_column(String(1))
    view_position: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[str | None] = mapped_column(Text)  # newline-separated
    # The value of the checkpoint's score for this view alone. For a pairwise (contra_)
    # score it is the per-view score, and z_score, threshold and anomalous judge the
    # difference to the other breast's same view once that view is scored.
    reconstruction_error: Mapped[float | None] = mapped_column(Float)
    # Mean squared error over the whole view, whatever the checkpoint's score.
    global_error: Mapped[float | None] = mapped_column(Float)
    score_name: Mapped[str | None] = mapped_column(String(64))
    z_score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    anomalous: Mapped[bool | None] = mapped_column(Boolean)
    calibration_group: Mapped[str | None] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(64))
    preprocessing_version: Mapped[str | None] = mapped_column(String(64))
    decode_ms: Mapped[float | None] = mapped_column(Float)
    preprocess_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    export_ms: Mapped[float | None] = mapped_column(Float)
    database_ms: Mapped[float | None] = mapped_column(Float)
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_path: Mapped[str | None] = mapped_column(Text)  # relative to the data directory
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Study(Base):
    """Summary of a study: ``open`` until its four standard views are scored or it goes quiet."""

    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)
    scored_views: Mapped[int] = mapped_column(Integer, default=0)
    max_z_left: Mapped[float | None] = mapped_column(Float)
    max_z_right: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    last_instance_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ExportJob(Base):
    """A Secondary Capture waiting to be sent to the configured destination."""

    __tablename__ = "export_jobs"
    __table_args__ = (UniqueConstraint("view_result_id", "destination", name="uq_export_job_destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    view_result_id: Mapped[int] = mapped_column(ForeignKey("view_results.id"), index=True)
    sc_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sc_path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    # pending -> sent, or pending -> dead after the maximum number of attempts.
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


def _configure_sqlite(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL lets the results CLI read while the worker writes; FULL makes each commit durable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_database(path: str | Path) -> tuple[Engine, sessionmaker]:
    """Open (and create if needed) the SQLite database at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}", future=True)
    event.listen(engine, "connect", _configure_sqlite)
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


# Nullable columns added after the first release, so a database written before them gains
# them with ALTER TABLE (create_all adds missing tables only).
ADDED_COLUMNS = {"view_results": {"global_error": "FLOAT", "score_name": "VARCHAR(64)"}}


def add_missing_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    with engine.begin() as connection:
        for table, columns in ADDED_COLUMNS.items():
            present = {column["name"] for column in inspector.get_columns(table)}
            for name, sql_type in columns.items():
                if name not in present:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))

"""Query the worker's results: ``python -m worker.results --data-dir DIR [options]``.

Prints view results (the default), study summaries (``--studies``) or export jobs
(``--exports``) as a table, JSON or CSV. ``--retry-exports`` moves dead export jobs back to
pending. The database is opened in WAL mode, so this runs safely while the worker writes.
Research use only: the scores are not for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import ExportJob, Study, ViewResult, open_database

DATABASE_NAME = "results.sqlite"
EXIT_USAGE = 2

VIEW_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "laterality",
    "view_position",
    "status",
    "reason",
    "warnings",
    "score_name",
    "reconstruction_error",
    "global_error",
    "z_score",
    "threshold",
    "anomalous",
    "calibration_group",
    "model_version",
    "preprocessing_version",
    "decode_ms",
    "preprocess_ms",
    "inference_ms",
    "export_ms",
    "database_ms",
    "sc_sop_instance_uid",
    "sc_path",
    "created_at",
    "updated_at",
)
STUDY_COLUMNS = (
    "study_instance_uid",
    "state",
    "scored_views",
    "max_z_left",
    "max_z_right",
    "flagged",
    "last_instance_at",
    "completed_at",
    "updated_at",
)
EXPORT_COLUMNS = (
    "id",
    "view_result_id",
    "sc_sop_instance_uid",
    "sc_path",
    "destination",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "created_at",
    "updated_at",
)
# Columns of the table format; JSON and CSV carry every column.
TABLE_COLUMNS = {
    "views": ("sop_instance_uid", "laterality", "view_position", "status", "z_score", "anomalous", "reason"),
    "studies": ("study_instance_uid", "state", "scored_views", "max_z_left", "max_z_right", "flagged"),
    "exports": ("id", "sc_sop_instance_uid", "destination", "state", "attempts", "last_error"),
}


def to_plain(value: Any) -> Any:
    """Convert timestamps (stored in UTC) to ISO 8601 with a ``Z``; other values pass unchanged."""
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds") + "Z"
    return value


def row_dict(row: Any, columns: Sequence[str]) -> dict[str, Any]:
    values = {column: to_plain(getattr(row, column)) for column in columns}
    if "warnings" in values:
        values["warnings"] = values["warnings"].split("\n") if values["warnings"] else []
    return values


def query_views(session: Session, study: str | None, flagged: bool) -> list[dict[str, Any]]:
    statement = select(ViewResult).order_by(ViewResult.study_instance_uid, ViewResult.id)
    if study:
        statement = statement.where(ViewResult.study_instance_uid == study)
    if flagged:
        statement = statement.where(ViewResult.anomalous.is_(True))
    return [row_dict(row, VIEW_COLUMNS) for row in session.scalars(statement)]


def query_studies(session: Session, study: str | None, flagged: bool) -> list[dict[str, Any]]:
    statement = select(Study).order_by(Study.last_instance_at, Study.study_instance_uid)
    if study:
        statement = statement.where(Study.study_instance_uid == study)
    if flagged:
        statement = statement.where(Study.flagged.is_(True))
    return [row_dict(row, STUDY_COLUMNS) for row in session.scalars(statement)]


def query_exports(session: Session, study: str | None) -> list[dict[str, Any]]:
    statement = select(ExportJob).order_by(ExportJob.id)
    if study:
        statement = statement.join(ViewResult, ViewResult.id == ExportJob.view_result_id).where(
            ViewResult.study_instance_uid == study
        )
    return [row_dict(row, EXPORT_COLUMNS) for row in session.scalars(statement)]


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(value)
    return str(value)


def render(rows: list[dict[str, Any]], columns: Sequence[str], table_columns: Sequence[str], output_format: str) -> str:
    if output_format == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: format_csv(value) for key, value in row.items()})
        return buffer.getvalue()
    cells = [[format_cell(row[column]) for column in table_columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(table_columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(table_columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def format_csv(value: Any) -> Any:
    if isinstance(value, list):
        return "\n".join(value)
    return value


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.results",
        description="List the worker's view results, study summaries or export jobs. Research use only.",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("./var"), help="the worker's data directory (default ./var)")
    parser.add_argument("--study", help="only this Study Instance UID")
    parser.add_argument("--flagged", action="store_true", help="only anomalous views, or flagged studies with --studies")
    listing = parser.add_mutually_exclusive_group()
    listing.add_argument("--studies", action="store_true", help="list study summaries instead of views")
    listing.add_argument("--exports", action="store_true", help="list export jobs (pending, sent, dead)")
    listing.add_argument("--retry-exports", action="store_true", help="move dead export jobs back to pending")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default table)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    database = args.data_dir / DATABASE_NAME
    if not database.is_file():
        print(
            f"error: no results database at {database}; pass the --data-dir the worker was started with",
            file=sys.stderr,
        )
        return EXIT_USAGE

    engine, session_factory = open_database(database)
    try:
        with session_factory() as session:
            if args.retry_exports:
                # Imported here because pydicom and pynetdicom take a second to import.
                from worker import forward

                moved = forward.retry_dead(session)
                session.commit()
                print(f"{moved} dead export jobs moved back to pending")
                return 0
            if args.studies:
                kind, columns = "studies", STUDY_COLUMNS
                rows = query_studies(session, args.study, args.flagged)
            elif args.exports:
                kind, columns = "exports", EXPORT_COLUMNS
                rows = query_exports(session, args.study)
            else:
                kind, columns = "views", VIEW_COLUMNS
                rows = query_views(session, args.study, args.flagged)
    finally:
        engine.dispose()
    sys.stdout.write(render(rows, columns, TABLE_COLUMNS[kind], args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-view latency of the processing pool, from spooled file to committed result row and SC.

The views are spooled and queued as the storage SCP would (file under spool/, Instance row
``queued``), then processed one at a time by worker.pipeline.process_instance in this
process, so the time excludes waiting in the queue.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from bench.config import BenchConfig
from bench.images import ENCODINGS, StudyFiles
from bench.profiling import profile_call, summary_table
from bench.report import Section, median, ratio, verdict
from model.dicom_pixels import MIN_REDUCED_SIDE
from model.scoring import Scorer
from worker import pipeline, spool
from worker.db import Instance, ViewResult, open_database, utcnow

GOAL_MS = 50.0
PARTS = ("decode_ms", "preprocess_ms", "inference_ms", "export_ms", "database_ms")


def queue_file(path: Path, data_dir: Path, session_factory, copy_index: int) -> int:
    """Spool a copy of ``path`` and add its queued Instance row; return the row id."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    content = path.read_bytes()
    digest = hashlib.sha256(content + str(copy_index).encode()).hexdigest()
    received_at = utcnow()
    relative = spool.spool_relative_path(str(header.SOPInstanceUID), digest, received_at)
    target = data_dir / relative
    spool.make_directories(target.parent)
    shutil.copyfile(path, target)
    with session_factory() as session:
        instance = Instance(
            sop_instance_uid=str(header.SOPInstanceUID),
            sop_class_uid=str(header.SOPClassUID),
            study_instance_uid=str(header.StudyInstanceUID),
            series_instance_uid=str(header.SeriesInstanceUID),
            transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
            calling_ae_title="BENCH",
            path=relative.as_posix(),
            sha256=digest,
            size=len(content),
            state="queued",
            attempts=0,
            received_at=received_at,
        )
        session.add(instance)
        session.commit()
        return instance.id


def process(instance_id: int, session_factory, context: pipeline.ProcessingContext) -> tuple[float, ViewResult]:
    """Claim and process one queued instance; return the wall time in ms and its result row."""
    claimed = pipeline.claim_next(session_factory)
    if claimed != instance_id:
        raise RuntimeError(f"claimed instance {claimed}, expected {instance_id}")
    started = time.perf_counter()
    pipeline.process_instance(instance_id, session_factory, context)
    elapsed = (time.perf_counter() - started) * 1000.0
    with session_factory() as session:
        result = session.scalar(select(ViewResult).where(ViewResult.instance_id == instance_id))
    if result is None or result.status != "scored":
        raise RuntimeError(f"instance {instance_id} was not scored: {result.reason if result else 'no result'}")
    return elapsed, result


def run(config: BenchConfig, studies: dict[str, StudyFiles]) -> Section:
    section = Section(
        "2b. Per-view latency in the worker",
        f"median at most {GOAL_MS:g} ms from spooled file to committed result row and Secondary Capture for a "
        "full-field JPEG 2000 view.",
    )
    data_dir = config.work_dir / "latency"
    engine, session_factory = open_database(data_dir / "results.sqlite")
    scorer = Scorer(config.checkpoint, threads=1)
    contexts = {
        "reduced": pipeline.ProcessingContext(data_dir=data_dir, scorer=scorer, decode_min_side=MIN_REDUCED_SIDE),
        "full": pipeline.ProcessingContext(data_dir=data_dir, scorer=scorer, decode_min_side=None),
    }
    pipeline.limit_blas_threads()

    # The first view pays for one-time set-up (highdicom's tables, ONNX Runtime's first run).
    warm_up = queue_file(studies["uncompressed"].paths[0], data_dir, session_factory, -1)
    process(warm_up, session_factory, contexts["reduced"])

    table = section.table(
        f"Medians over {config.timed_views} views x {config.latency_repeats} runs (full decode: x 1), in ms; "
        f"{scorer.backend} backend, 1 thread; wall is process_instance from claim to commit:",
        ["encoding", "decode path", "wall", *[part.removesuffix("_ms") for part in PARTS], "other"],
    )
    walls: dict[tuple[str, str], float | None] = {}
    copy_index = 0
    for encoding in ENCODINGS:
        for path_name, context in contexts.items():
            repeats = config.latency_repeats if path_name == "reduced" else 1
            measured: list[tuple[float, ViewResult]] = []
            for _ in range(repeats):
                for path in studies[encoding].paths[: config.timed_views]:
                    copy_index += 1
                    instance_id = queue_file(path, data_dir, session_factory, copy_index)
                    measured.append(process(instance_id, session_factory, context))
            wall = median(elapsed for elapsed, _ in measured)
            parts = [median(getattr(result, part) or 0.0 for _, result in measured) for part in PARTS]
            other = median(elapsed - sum(getattr(result, part) or 0.0 for part in PARTS) for elapsed, result in measured)
            walls[(encoding, path_name)] = wall
            table.add(encoding, path_name, wall, *parts, other)

    jpeg2000 = walls[("jpeg2000", "reduced")]
    decode_ms, export_ms = (table.rows[0][3], table.rows[0][6])
    if jpeg2000 and decode_ms is not None and export_ms is not None:
        section.notes.append(
            f"Of the {jpeg2000:.0f} ms of a JPEG 2000 view, the decode at resolution level 3 takes {decode_ms:.0f} ms "
            f"(OpenJPEG through Pillow, one thread, 1/64 of the wavelet data) and the Secondary Capture export "
            f"{export_ms:.0f} ms (worker/export.py: building the object with highdicom, rendering the panels, "
            f"writing it with fsync); together {100 * (decode_ms + export_ms) / jpeg2000:.0f}% of the wall time."
        )
    section.notes.append(
        "\"other\" is the wall time not covered by the result row's timings: reading the spooled file with "
        "pydicom, the study summary and the final commit. Reduced against full decode, end to end: "
        + ", ".join(
            f"{encoding} {ratio(walls[(encoding, 'full')], walls[(encoding, 'reduced')]):.0f}x faster"
            for encoding in ENCODINGS
        )
        + "."
    )
    met = jpeg2000 is not None and jpeg2000 <= GOAL_MS
    section.verdict = verdict(
        met,
        f"{jpeg2000:.0f} ms median for the JPEG 2000 view",
        f"at most {GOAL_MS:g} ms",
        f"by {jpeg2000 - GOAL_MS:.0f} ms; see the profile below" if jpeg2000 else "",
    )
    config.results["latency_jpeg2000_ms"] = jpeg2000

    if not config.smoke:
        copy_index += 1
        instance_id = queue_file(studies["jpeg2000"].paths[1], data_dir, session_factory, copy_index)
        (elapsed, _), stats = profile_call(lambda: process(instance_id, session_factory, contexts["reduced"]))
        section.tables.append(
            (
                f"cProfile of one JPEG 2000 view ({elapsed:.0f} ms with the profiler's overhead), functions by "
                "cumulative time:",
                summary_table(stats, sort="cumtime", limit=22, total_s=elapsed / 1000.0),
            )
        )
    engine.dispose()
    shutil.rmtree(data_dir, ignore_errors=True)
    return section


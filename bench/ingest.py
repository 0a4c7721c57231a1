"""Ingest against DCMTK storescp, per-view timings of the worker's result rows, and study turnaround.

Each round sends the same four-view study, with new UIDs, once to the worker and once to
storescp, alternating which goes first. Before each send the worker has finished
processing everything earlier, so both receivers start from an idle machine.
"""

from __future__ import annotations

import logging
import shutil
import time

from bench import dicom_peers
from bench.config import BenchConfig
from bench.images import ENCODINGS, StudyFiles
from bench.report import Section, median, ratio, verdict

logger = logging.getLogger(__name__)

GOAL_RATIO = 0.9
TURNAROUND_GOAL_S = 1.0
POLL_INTERVAL_S = 0.01
TURNAROUND_TIMEOUT_S = 120.0


def wait_for_study(worker: dicom_peers.Receiver, study_uid: str, views: int) -> float:
    """Seconds until the study summary and every view's SC are committed, polled every POLL_INTERVAL_S."""
    started = time.perf_counter()
    while not dicom_peers.study_complete(worker, study_uid, views):
        if time.perf_counter() - started > TURNAROUND_TIMEOUT_S:
            raise TimeoutError(f"study {study_uid} was not complete {TURNAROUND_TIMEOUT_S:.0f} s after its last C-STORE")
        time.sleep(POLL_INTERVAL_S)
    return time.perf_counter() - started


def run(config: BenchConfig, studies: dict[str, StudyFiles], worker: dicom_peers.Receiver | None = None) -> list[Section]:
    """Run sections 1, 2c and 4 with ``worker``, or with a worker of its own when None."""
    ingest = Section(
        "1. Ingest: worker against DCMTK storescp",
        f"storescu's wall time sending a four-view study to the worker at most {GOAL_RATIO:g}x its time sending "
        "it to DCMTK storescp, with the worker's fsync and database row.",
    )
    rows = Section(
        "2c. Per-view timings in the worker's result rows",
        "the split of the 2b latency as the running worker records it (views processed while the study "
        "arrives, two processing threads).",
    )
    turnaround = Section(
        "4. Study turnaround",
        f"at most {TURNAROUND_GOAL_S:g} s from the last C-STORE response of a four-view study to its summary and "
        "its four Secondary Captures committed.",
    )
    folder = config.work_dir / "ingest"
    own_worker = worker is None
    if worker is None:
        worker = dicom_peers.start_worker(folder / "worker", config.checkpoint)
    worker.wait_ready()
    storescp = dicom_peers.start_storescp(folder / "storescp")
    times: dict[tuple[str, str], list[float]] = {}
    turnarounds: dict[str, list[float]] = {encoding: [] for encoding in ENCODINGS}
    timings: dict[str, list[dict[str, object]]] = {encoding: [] for encoding in ENCODINGS}
    try:
        for round_index in range(config.ingest_repeats):
            for encoding in ENCODINGS:
                key = f"ingest-{encoding}-{round_index}"
                study_uid, copies = dicom_peers.copy_study(studies[encoding].paths, folder / "send", key)
                order = (worker, storescp) if round_index % 2 == 0 else (storescp, worker)
                for receiver in order:
                    dicom_peers.wait_until_idle(worker)
                    time.sleep(config.settle_s)
                    elapsed = dicom_peers.storescu(receiver, copies, jpeg2000=encoding == "jpeg2000")
                    times.setdefault((encoding, receiver.name), []).append(elapsed)
                    if receiver is worker:
                        turnarounds[encoding].append(wait_for_study(worker, study_uid, len(copies)))
                        timings[encoding].extend(dicom_peers.view_timings(worker, study_uid))
                    else:
                        shutil.rmtree(storescp.folder, ignore_errors=True)
                        storescp.folder.mkdir()
                shutil.rmtree(folder / "send", ignore_errors=True)
    finally:
        if own_worker:
            worker.stop()
        storescp.stop()

    table = ingest.table(
        f"storescu wall time per four-view study in s, medians of {config.ingest_repeats} rounds; ratio is worker "
        "over storescp:",
        ["encoding", "MB per study", "worker", "storescp", "ratio", "worker MB/s"],
    )
    worst = None
    for encoding in ENCODINGS:
        worker_s = median(times[(encoding, "worker")])
        storescp_s = median(times[(encoding, "DCMTK storescp")])
        share = ratio(worker_s, storescp_s)
        megabytes = studies[encoding].total_bytes / 1e6
        table.add(encoding, megabytes, worker_s, storescp_s, share, megabytes / worker_s if worker_s else None)
        worst = share if worst is None or (share is not None and share > worst) else worst
    ingest.notes.append(
        "storescp runs with `+xa` (accept every transfer syntax) and writes each object to a file without "
        "fsync. storescu sends uncompressed files as they are and JPEG 2000 files with "
        "`--propose-j2k-lossless`. The worker spools each object with fsync of the file and its folder and "
        "commits its Instance row before it sends Success (invariant 1 of the design). Its two processing "
        "threads start on the first views while the later ones arrive, and share the cores with receiving."
    )
    config.results["ingest_ratio"] = worst
    ingest.verdict = verdict(
        worst is not None and worst <= GOAL_RATIO,
        f"worst ratio {worst:.2f}" if worst is not None else "no ratio",
        f"at most {GOAL_RATIO:g}",
        f"by {worst - GOAL_RATIO:.2f}; see the profile of the receiving threads below" if worst else "",
    )

    parts = ("decode_ms", "preprocess_ms", "inference_ms", "export_ms", "database_ms")
    split = rows.table(
        "Medians over all views received in section 1, in ms:",
        ["encoding", "views", *[part.removesuffix("_ms") for part in parts], "sum", "decode path"],
    )
    for encoding in ENCODINGS:
        values = timings[encoding]
        medians = [median(float(row[part]) for row in values if row[part] is not None) for part in parts]
        notes = {line for row in values for line in str(row["warnings"] or "").splitlines() if line.startswith("decoded")}
        split.add(encoding, len(values), *medians, sum(value or 0.0 for value in medians), "; ".join(sorted(notes)) or "full decode")

    for encoding in ENCODINGS:
        worst_turnaround = max(turnarounds[encoding]) if turnarounds[encoding] else None
        turnaround.table(
            f"{encoding}: seconds from storescu's exit to the complete study, polled every {POLL_INTERVAL_S * 1000:.0f} ms:",
            ["rounds", "median", "max"],
        ).add(len(turnarounds[encoding]), median(turnarounds[encoding]), worst_turnaround)
    all_turnarounds = [value for values in turnarounds.values() for value in values]
    slowest = median(all_turnarounds)
    turnaround.notes.append(
        "storescu exits right after the last C-STORE response and the association release, so its exit "
        "marks the last response to within a few milliseconds. Views are processed while later views are "
        "still arriving, so the turnaround is mostly the last view's processing."
    )
    turnaround.verdict = verdict(
        slowest is not None and slowest <= TURNAROUND_GOAL_S,
        f"median {slowest:.2f} s over both encodings" if slowest is not None else "no figure",
        f"at most {TURNAROUND_GOAL_S:g} s",
    )
    config.results["turnaround_s"] = slowest
    return [ingest, rows, turnaround]


def profile_receive(config: BenchConfig, studies: dict[str, StudyFiles]) -> Section:
    """Profile every thread of an in-process worker while it receives one study of each encoding."""
    from bench.profiling import merged, summary_table, thread_profiles, waiting_seconds
    from model.scoring import Scorer  # noqa: F401  (imported before profiling starts)
    from worker.serve import Worker
    from worker.settings import load_settings

    section = Section(
        "1a. Where the worker's receiving time goes",
        "explain the ingest ratio: cProfile of every thread of a worker in the benchmark process while storescu "
        "sends one study per encoding; processing is off (processing.workers = 0) so only receiving is seen.",
    )
    folder = config.work_dir / "profile"
    port = dicom_peers.free_port()
    settings = load_settings(
        environ={},
        overrides={
            "storage.data_dir": str(folder / "worker"),
            "dicom.port": port,
            "processing.checkpoint": str(config.checkpoint),
            "processing.workers": 0,
            "storage.free_disk_floor_mb": 1,
        },
    )
    worker = Worker(settings)
    receiver = dicom_peers.Receiver("worker", dicom_peers.WORKER_AE_TITLE, port, None, folder / "worker")
    elapsed = 0.0
    with thread_profiles() as profiles:
        worker.start()
        try:
            for encoding in ENCODINGS:
                _, copies = dicom_peers.copy_study(studies[encoding].paths, folder / "send", f"profile-{encoding}")
                elapsed += dicom_peers.storescu(receiver, copies, jpeg2000=encoding == "jpeg2000")
        finally:
            worker.stop()
    shutil.rmtree(folder, ignore_errors=True)
    stats = merged(profiles)
    if stats is not None:
        section.tables.append(
            (
                f"Functions by self time, summed over all threads, waits left out ({elapsed:.2f} s of storescu wall "
                "time for both studies with the profiler's overhead):",
                summary_table(stats, sort="tottime", limit=16, total_s=elapsed, skip_waiting=True),
            )
        )
        section.notes.append(
            f"The threads spent {waiting_seconds(stats):.2f} s in all waiting in lock acquire, select, poll and "
            "time.sleep, summed over threads; pynetdicom's association and DUL threads poll with short sleeps."
        )
    return section



def pynetdicom_floor(config: BenchConfig, studies: dict[str, StudyFiles]) -> Section:
    """Time a minimal pynetdicom storage SCP against storescp: what any pynetdicom receiver costs.

    The minimal SCP does only what the goal requires: it writes the received Part 10
    bytes to a file, fsyncs the file and its folder, and commits one SQLite row, in
    the C-STORE handler, before Success. It skips the worker's header check, SHA-256
    and duplicate lookup.
    """
    import os
    import sqlite3

    from pynetdicom import AE, evt
    from pynetdicom import sop_class as sop_classes

    from worker.scp import decodable_transfer_syntaxes

    section = Section(
        "1b. Floor of a pynetdicom receiver",
        "show how close any receiver built on pynetdicom can come to storescp on this machine.",
    )
    folder = config.work_dir / "floor"
    spool_dir = folder / "spool"
    spool_dir.mkdir(parents=True)
    connection = sqlite3.connect(folder / "rows.sqlite", check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE received (sop_instance_uid TEXT, size INTEGER)")

    def handle_store(event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        data = event.encoded_dataset(include_meta=True)
        temporary = spool_dir / f".{uid}.partial"
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, spool_dir / f"{uid}.dcm")
        descriptor = os.open(spool_dir, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        connection.execute("INSERT INTO received VALUES (?, ?)", (uid, len(data)))
        connection.commit()
        return 0x0000

    ae = AE(ae_title=dicom_peers.WORKER_AE_TITLE)
    ae.maximum_pdu_size = 262144  # the worker's dicom.max_pdu
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(sop_classes.DigitalMammographyXRayImageStorageForPresentation, syntaxes)
    port = dicom_peers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    floor = dicom_peers.Receiver("pynetdicom", dicom_peers.WORKER_AE_TITLE, port, None, spool_dir)
    storescp = dicom_peers.start_storescp(folder / "storescp")
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for round_index in range(config.ingest_repeats):
            for encoding in ENCODINGS:
                for receiver in (floor, storescp) if round_index % 2 == 0 else (storescp, floor):
                    time.sleep(config.settle_s)
                    elapsed = dicom_peers.storescu(receiver, studies[encoding].paths, jpeg2000=encoding == "jpeg2000")
                    times.setdefault((encoding, receiver.name), []).append(elapsed)
                    shutil.rmtree(receiver.folder, ignore_errors=True)
                    receiver.folder.mkdir()
    finally:
        server.shutdown()
        storescp.stop()
        connection.close()
    shutil.rmtree(folder, ignore_errors=True)

    table = section.table(
        f"storescu wall time per four-view study in s, medians of {config.ingest_repeats} rounds:",
        ["encoding", "minimal pynetdicom SCP", "storescp", "ratio"],
    )
    floor_ratios = []
    for encoding in ENCODINGS:
        minimal = median(times[(encoding, "pynetdicom")])
        reference = median(times[(encoding, "DCMTK storescp")])
        floor_ratios.append(ratio(minimal, reference))
        table.add(encoding, minimal, reference, floor_ratios[-1])
    worker_ratio = config.results.get("ingest_ratio")
    if worker_ratio is not None and None not in floor_ratios:
        floor = max(floor_ratios)
        if floor <= GOAL_RATIO:
            verdict_text = "so pynetdicom's receiving, the fsyncs and the row fit within the goal"
        else:
            verdict_text = "so in this run even pynetdicom's receiving, the fsyncs and the row missed the goal"
        section.notes.append(
            f"The minimal SCP's worst ratio is {floor:.2f} against the worker's {worker_ratio:.2f} in section 1, "
            f"{verdict_text}. The difference between the two is the worker's own work per object in "
            "worker/scp.py, visible in section 1a: a SHA-256 of the dataset, pydicom's parsing and "
            "validation of every header element (iterall), and two duplicate lookups in the database. These "
            "run in the association thread while storescu waits for the C-STORE response."
        )
    return section

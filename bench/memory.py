"""Peak memory of the worker while four associations send full-field studies at once."""

from __future__ import annotations

import shutil
import subprocess
import time

from bench import dicom_peers
from bench.config import BenchConfig
from bench.images import StudyFiles
from bench.report import Section, verdict

GOAL_BYTES = 2**30


def run(config: BenchConfig, studies: dict[str, StudyFiles], shared_worker: dicom_peers.Receiver | None = None) -> Section:
    """Measure with a fresh worker per encoding, or with ``shared_worker`` (smoke runs) for all."""
    section = Section(
        "6. Memory",
        "peak resident set size (VmHWM in /proc/PID/status) of the worker at most 1 GiB while "
        f"{config.memory_associations} associations send full-field studies at once.",
    )
    folder = config.work_dir / "memory"
    table = section.table(
        f"{'One fresh worker' if shared_worker is None else 'The ingest benchmark’s worker'} (2 processing threads) "
        f"per encoding; {config.memory_associations} storescu processes "
        "start together, each sending its own four-view study; VmHWM read after every view is processed:",
        ["encoding", "MB sent", "VmHWM before MiB", "VmHWM peak MiB", "wall s for all studies"],
    )
    peaks = []
    for encoding, study in studies.items():
        worker = shared_worker or dicom_peers.start_worker(folder / f"worker-{encoding}", config.checkpoint)
        worker.wait_ready()
        try:
            baseline = dicom_peers.peak_rss_bytes(worker.process)
            sends = []
            for index in range(config.memory_associations):
                _, copies = dicom_peers.copy_study(study.paths, folder / "send", f"memory-{encoding}-{index}")
                sends.append(copies)
            options = ["--propose-j2k-lossless"] if encoding == "jpeg2000" else []
            started = time.perf_counter()
            clients = [
                subprocess.Popen(
                    [dicom_peers.dcmtk_tool("storescu"), *options, "--call", worker.ae_title, "127.0.0.1", str(worker.port), *map(str, copies)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for copies in sends
            ]
            for client in clients:
                _, errors = client.communicate(timeout=600)
                if client.returncode != 0:
                    raise RuntimeError(f"storescu failed with status {client.returncode}: {errors.decode()[-500:]}")
            wall = time.perf_counter() - started
            dicom_peers.wait_until_idle(worker)
            peak = dicom_peers.peak_rss_bytes(worker.process)
        finally:
            if shared_worker is None:
                worker.stop()
            shutil.rmtree(folder / "send", ignore_errors=True)
        peaks.append(peak)
        table.add(encoding, study.total_bytes * config.memory_associations / 1e6, baseline / 2**20, peak / 2**20, wall)
    shutil.rmtree(folder, ignore_errors=True)
    worst = max(peaks)
    config.results["peak_rss_bytes"] = worst
    section.verdict = verdict(
        worst <= GOAL_BYTES,
        f"{worst / 2**20:.0f} MiB at most",
        "at most 1024 MiB",
        f"by {(worst - GOAL_BYTES) / 2**20:.0f} MiB",
    )
    return section

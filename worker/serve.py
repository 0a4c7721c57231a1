"""Run the DICOM worker: ``python -m worker.serve [--config FILE] [--data-dir DIR] ...``.

Research use only: the worker is not a medical device and its scores are not for diagnosis.

Start-up loads and checks the settings and the checkpoint, requeues instances an earlier
run left unfinished, starts the processing pool, the study monitor and (when a destination
is set) the forwarder, and then listens for associations. SIGTERM or SIGINT stops the
listener, lets the processing threads finish within ``processing.shutdown_timeout_s`` (what
does not finish goes back to ``queued``), stops the forwarder, closes the database and
exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom
import numpy as np
import pydicom

from model.checkpoint import Checkpoint, code_version, load_checkpoint
from model.preprocess import PREPROCESSING_VERSION
from model.scoring import Scorer
from worker import forward, pipeline, scp, spool
from worker.db import open_database
from worker.settings import Settings, SettingsError, load_settings
from worker.studies import StudyMonitor

logger = logging.getLogger(__name__)

DATABASE_NAME = "results.sqlite"
EXIT_CONFIGURATION = 2
EXIT_START_FAILED = 1


class StartupError(RuntimeError):
    """The worker cannot start with these settings or this checkpoint."""


def torch_threads(settings: Settings) -> int:
    if settings.processing.torch_threads:
        return settings.processing.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, settings.processing.workers))


def load_scorer(settings: Settings) -> Scorer:
    path = settings.processing.checkpoint or None
    try:
        checkpoint: Checkpoint = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise StartupError(f"{err} (processing.checkpoint / --checkpoint)") from err
    if checkpoint.preprocessing_version != PREPROCESSING_VERSION:
        raise StartupError(
            f"checkpoint was trained with preprocessing {checkpoint.preprocessing_version!r} but this code "
            f"preprocesses with {PREPROCESSING_VERSION!r}; use a checkpoint made for {PREPROCESSING_VERSION!r}"
        )
    rule = settings.processing.threshold_rule
    return Scorer(checkpoint, threshold_rule=None if rule == "checkpoint" else rule, threads=torch_threads(settings))  # type: ignore[arg-type]


def warm_up(scorer: Scorer) -> None:
    """Do the one-time work of the first view before the first instance arrives.

    The first inference initialises torch's kernels, and highdicom reads its tables of the
    DICOM standard (about a second) when the first Secondary Capture is built.
    """
    started = time.perf_counter()
    size = scorer.view_size
    scorer.score(np.zeros((size, size), dtype=np.float32), "L", "CC")
    source = pydicom.Dataset()
    source.SOPClassUID = scp.STORAGE_SOP_CLASSES[0]
    source.Manufacturer = "warm-up"
    highdicom.ContributingEquipment.for_image_acquisition(source)
    logger.debug("Warm-up took %.0f ms", (time.perf_counter() - started) * 1000.0)


class Worker:
    """The running worker: database, processing pool, study monitor, forwarder and SCP."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.engine: Any = None
        self.session_factory: Any = None
        self.pool: pipeline.ProcessingPool | None = None
        self.monitor: StudyMonitor | None = None
        self.forwarder: Any = None
        self.ae: Any = None
        self.server: Any = None
        self.scorer: Scorer | None = None

    def start(self) -> None:
        settings = self.settings
        self.scorer = load_scorer(settings)
        warm_up(self.scorer)

        for name in (spool.SPOOL_DIRNAME, pipeline.EXPORTS_DIRNAME):
            spool.make_directories(self.data_dir / name)
            spool.remove_temporary_files(self.data_dir / name)
        self.engine, self.session_factory = open_database(self.data_dir / DATABASE_NAME)
        pipeline.recover_interrupted(self.session_factory)

        destination = None
        if settings.forward.enabled:
            destination = forward.Destination(settings.forward.ae_title, settings.forward.host, settings.forward.port)
            self.forwarder = forward.Forwarder(
                self.session_factory,
                self.data_dir,
                destination,
                calling_ae_title=settings.dicom.ae_title,
                max_attempts=settings.forward.max_attempts,
                backoff_initial_s=settings.forward.backoff_initial_s,
                backoff_max_s=settings.forward.backoff_max_s,
            )
            self.forwarder.start()

        context = pipeline.ProcessingContext(
            data_dir=self.data_dir,
            scorer=self.scorer,
            uid_root=settings.export.uid_root,
            quiet_period_s=settings.processing.quiet_period_s,
            max_attempts=settings.processing.max_attempts,
            decode_min_side=settings.processing.reduced_decode_min_side or None,
            destination=str(destination) if destination is not None else None,
            on_export_queued=self.forwarder.wake if self.forwarder is not None else (lambda: None),
        )
        self.pool = pipeline.ProcessingPool(
            self.session_factory, context, settings.processing.workers, settings.processing.poll_interval_s
        )
        self.pool.start()
        self.monitor = StudyMonitor(self.session_factory, settings.processing.quiet_period_s)
        self.monitor.start()

        transfer_syntaxes = scp.decodable_transfer_syntaxes()
        self.ae = scp.build_ae(settings.dicom, transfer_syntaxes)
        store_context = scp.StoreContext(
            data_dir=self.data_dir,
            session_factory=self.session_factory,
            free_disk_floor_bytes=settings.storage.free_disk_floor_mb * 2**20,
            on_stored=self.pool.wake,
        )
        try:
            self.server = scp.start_server(self.ae, settings.dicom, store_context)
        except OSError as err:
            raise StartupError(f"cannot listen on {settings.dicom.host}:{settings.dicom.port}: {err}") from err
        self.log_banner(transfer_syntaxes)

    def log_banner(self, transfer_syntaxes: list[Any]) -> None:
        settings = self.settings
        checkpoint = self.scorer.checkpoint if self.scorer else None
        logger.info("mammo-vae-worker %s: RESEARCH USE ONLY, not a medical device, not for diagnosis", code_version())
        logger.info(
            "Checkpoint %s: model version %s (SHA-256 %s), preprocessing %s, threshold rule %s",
            settings.processing.checkpoint or "(shipped default)",
            self.scorer.model_version if self.scorer else "?",
            checkpoint.sha256 if checkpoint else "?",
            PREPROCESSING_VERSION,
            self.scorer.threshold_rule if self.scorer else "?",
        )
        logger.info(
            "Listening as %s on %s:%d: Verification and %d storage SOP classes in %d transfer syntaxes",
            settings.dicom.ae_title,
            settings.dicom.host,
            self.port,
            len(scp.STORAGE_SOP_CLASSES),
            len(transfer_syntaxes),
        )
        logger.debug("Transfer syntaxes: %s", ", ".join(uid.name for uid in transfer_syntaxes))
        logger.info(
            "Data directory %s; %d processing threads with %d torch threads; forwarding %s",
            self.data_dir,
            settings.processing.workers,
            torch_threads(settings),
            f"to {settings.forward.ae_title}@{settings.forward.host}:{settings.forward.port}"
            if settings.forward.enabled
            else "off",
        )
        if not settings.dicom.allowed_calling_ae_titles:
            logger.warning(
                "Any calling AE title may associate: dicom.allowed_calling_ae_titles is empty; "
                "list the modalities and PACS that may send"
            )

    @property
    def port(self) -> int:
        if self.server is None:
            return self.settings.dicom.port
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop listening, finish or requeue processing, stop the forwarder, close the database."""
        settings = self.settings
        if self.server is not None:
            self.server.shutdown()
            scp.wait_for_associations(self.ae, settings.dicom.network_timeout_s)
            self.server = None
        if self.pool is not None:
            self.pool.stop(settings.processing.shutdown_timeout_s)
            self.pool = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        logger.info("Worker stopped")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.serve",
        description="DICOM storage SCP that scores mammography views with a VAE. Research use only, not a medical device.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: config/worker.toml of the source tree)")
    parser.add_argument("--data-dir", help="directory of the spool, results.sqlite and exports (storage.data_dir)")
    parser.add_argument("--host", help="address to listen on (dicom.host), for example 127.0.0.1 or 0.0.0.0")
    parser.add_argument("--port", type=int, help="TCP port to listen on (dicom.port)")
    parser.add_argument("--ae-title", help="AE title of the worker (dicom.ae_title)")
    parser.add_argument("--checkpoint", help="checkpoint file to score with (processing.checkpoint); default: the shipped one")
    parser.add_argument("--workers", type=int, help="processing threads (processing.workers); 0 only receives")
    parser.add_argument("-v", "--verbose", action="store_true", help="log DEBUG messages, pynetdicom's included")
    return parser.parse_args(argv)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO and DEBUG, highdicom each copied module at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # pydicom's warnings about invalid values quote the value, which may be a patient's
    # name, and it logs at ERROR each decoder plugin that fails even when a later plugin
    # decodes the data. A decode that fails in the end raises, and the pool logs that, so
    # pydicom's own lines are kept out of the log unless -v is given.
    if not verbose:
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    configure_logging(args.verbose)
    overrides = {
        key: value
        for key, value in (
            ("storage.data_dir", args.data_dir),
            ("dicom.host", args.host),
            ("dicom.port", args.port),
            ("dicom.ae_title", args.ae_title),
            ("processing.checkpoint", args.checkpoint),
            ("processing.workers", args.workers),
        )
        if value is not None
    }
    try:
        settings = load_settings(args.config, overrides=overrides)
    except SettingsError as err:
        logger.error("%s", err)
        return EXIT_CONFIGURATION

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("Received %s; shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    worker = Worker(settings)
    try:
        worker.start()
    except StartupError as err:
        logger.error("Cannot start: %s", err)
        worker.stop()
        return EXIT_CONFIGURATION
    except OSError as err:
        logger.error("Cannot start: %s", err)
        worker.stop()
        return EXIT_START_FAILED

    while not stop_requested.wait(1.0):
        pass
    worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

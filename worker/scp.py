"""The storage SCP: presentation contexts, the association server and its handlers.

The C-STORE handler only makes the received instance durable: it writes the dataset, as
received, to a Part 10 file in the spool, records a queued Instance row and commits, and
only then returns Success. It parses the header to check it and never decodes pixel data,
so the association thread does no image work.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pydicom
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom import sop_class as sop_classes
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker import spool, studies
from worker.db import Instance, utcnow
from worker.settings import DicomSettings

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    sop_classes.DigitalMammographyXRayImageStorageForPresentation,
    sop_classes.DigitalMammographyXRayImageStorageForProcessing,
    sop_classes.DigitalXRayImageStorageForPresentation,
    sop_classes.DigitalXRayImageStorageForProcessing,
    sop_classes.ComputedRadiographyImageStorage,
    sop_classes.BreastTomosynthesisImageStorage,
    sop_classes.BreastProjectionXRayImageStorageForPresentation,
    sop_classes.BreastProjectionXRayImageStorageForProcessing,
)

# Transfer syntaxes offered when their decoder is installed, in order of preference.
CANDIDATE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.RLELossless,
)

# Pixel Data, Float Pixel Data and Double Float Pixel Data: the header ends before them.
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

# DIMSE statuses of the Storage Service Class (DICOM PS3.4 table B.2-1).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_SOP_INSTANCE = 0xC211


def decodable_transfer_syntaxes() -> list[UID]:
    """Candidate transfer syntaxes whose pixel data the installed pydicom plugins decode.

    A syntax whose decoder plugin is missing is left out, so peers must send such data in
    another syntax instead of having undecodable data accepted.
    """
    accepted = []
    for uid in CANDIDATE_TRANSFER_SYNTAXES:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        if decoder.is_available:
            accepted.append(uid)
        else:
            logger.debug("Transfer syntax %s left out: no decoder plugin is installed", uid.name)
    return accepted


@dataclass
class StoreContext:
    """Dependencies of the C-STORE handler: data directory, database and the pool to wake."""

    data_dir: Path
    session_factory: sessionmaker
    free_disk_floor_bytes: int
    # Called after an instance row was committed, to wake the processing pool.
    on_stored: Callable[[], None] = lambda: None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class StoreRequest:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    transfer_syntax_uid: str
    calling_ae_title: str
    # Preamble, "DICM" prefix and encoded file meta; the Part 10 file is this followed by the dataset.
    file_prefix: bytes
    # The dataset as received, a view of pynetdicom's receive buffer rather than a copy.
    dataset_bytes: memoryview


class StoreRejected(Exception):
    """The request cannot be stored; ``status`` is the DIMSE status to send back."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def handle_store(event: Event, context: StoreContext) -> int:
    """Store one C-STORE request durably and return its DIMSE status."""
    started = time.perf_counter()
    request = event.request
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    calling_ae_title = event.assoc.requestor.ae_title
    parsed: StoreRequest | None = None
    try:
        parsed = parse_request(event, context)
        instance, duplicate = store_instance(parsed, context)
    except StoreRejected as err:
        logger.error(
            "C-STORE of SOP Instance UID %r from AE %r rejected with status 0x%04X: %s",
            sop_instance_uid,
            calling_ae_title,
            err.status,
            err,
        )
        return err.status
    except Exception:  # noqa: BLE001 - the handler must answer every request
        logger.exception(
            "C-STORE of SOP Instance UID %r from AE %r failed; returned Out of Resources (0x%04X)",
            sop_instance_uid,
            calling_ae_title,
            STATUS_OUT_OF_RESOURCES,
        )
        return STATUS_OUT_OF_RESOURCES
    finally:
        # pynetdicom closes the receive buffer after the handler returns, which fails while
        # a view of it is still exported.
        if parsed is not None:
            parsed.dataset_bytes.release()

    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if duplicate:
        logger.info(
            "Received SOP Instance UID %s again with identical content from AE %r; acknowledged, not queued (%.0f ms)",
            parsed.sop_instance_uid,
            calling_ae_title,
            elapsed_ms,
        )
        return STATUS_SUCCESS
    logger.info(
        "Received SOP Instance UID %s: SOP class %s, transfer syntax %s, calling AE %r, %d bytes, %.0f ms%s",
        parsed.sop_instance_uid,
        UID(parsed.sop_class_uid).name,
        UID(parsed.transfer_syntax_uid).name,
        calling_ae_title,
        instance.size,
        elapsed_ms,
        f"; conflicts with instance {instance.conflicts_with_id}" if instance.conflicts_with_id else "",
    )
    context.on_stored()
    return STATUS_SUCCESS


def parse_request(event: Event, context: StoreContext) -> StoreRequest:
    """Check the request and parse the dataset's header without decoding pixel data."""
    request = event.request
    sop_class_uid = str(request.AffectedSOPClassUID or "")
    try:
        sop_instance_uid = spool.check_uid(request.AffectedSOPInstanceUID, "Affected SOP Instance UID")
    except spool.InvalidUID as err:
        raise StoreRejected(STATUS_INVALID_SOP_INSTANCE, str(err)) from err

    free = spool.free_disk_bytes(context.data_dir)
    if free < context.free_disk_floor_bytes:
        raise StoreRejected(
            STATUS_OUT_OF_RESOURCES,
            f"free disk space {free // 2**20} MB under {context.data_dir} is below the floor of "
            f"{context.free_disk_floor_bytes // 2**20} MB (storage.free_disk_floor_mb)",
        )

    transfer_syntax_uid = str(event.context.transfer_syntax)
    buffer = cast(io.BytesIO, request.DataSet)
    try:
        header = read_header(buffer, UID(transfer_syntax_uid))
        dataset_sop_class = str(header.get("SOPClassUID", ""))
        dataset_sop_instance = str(header.get("SOPInstanceUID", ""))
        study_instance_uid = header.get("StudyInstanceUID")
        series_instance_uid = header.get("SeriesInstanceUID")
    except Exception as err:  # noqa: BLE001 - any parse failure means the dataset cannot be understood
        raise StoreRejected(
            STATUS_CANNOT_UNDERSTAND,
            f"dataset could not be parsed with transfer syntax {transfer_syntax_uid}: {type(err).__name__}: {err}",
        ) from err
    file_prefix = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))

    if dataset_sop_class != sop_class_uid:
        raise StoreRejected(
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP Class UID {dataset_sop_class!r} does not match the Affected SOP Class UID {sop_class_uid!r}",
        )
    if dataset_sop_instance != sop_instance_uid:
        raise StoreRejected(
            STATUS_INVALID_SOP_INSTANCE,
            f"dataset SOP Instance UID {dataset_sop_instance!r} does not match the Affected SOP Instance UID",
        )
    study_instance_uid = optional_uid(study_instance_uid, "StudyInstanceUID")
    series_instance_uid = optional_uid(series_instance_uid, "SeriesInstanceUID")
    return StoreRequest(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        calling_ae_title=event.assoc.requestor.ae_title,
        file_prefix=file_prefix,
        dataset_bytes=buffer.getbuffer(),
    )


def read_header(buffer: io.BytesIO, transfer_syntax: UID) -> pydicom.Dataset:
    """Parse the received dataset up to its pixel data, without copying the buffer.

    Deflated data must be inflated first, so only that rare syntax costs a copy.
    """
    buffer.seek(0)
    if transfer_syntax.is_deflated:
        header = pydicom.dcmread(io.BytesIO(inflate_dataset(buffer.getvalue())), force=True, stop_before_pixels=True)
    else:
        header = read_dataset(
            buffer,
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag in PIXEL_DATA_TAGS,
        )
    # Reading every element now turns a malformed header into an error here, not in the pool.
    for _ in header.iterall():
        pass
    buffer.seek(0)
    return header


def inflate_dataset(data: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate, no zlib header)."""
    return zlib.decompress(data, -zlib.MAX_WBITS)


def optional_uid(value: object, keyword: str) -> str | None:
    if value is None or str(value) == "":
        return None
    try:
        return spool.check_uid(value, keyword)
    except spool.InvalidUID as err:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, str(err)) from err


def store_instance(parsed: StoreRequest, context: StoreContext) -> tuple[Instance, bool]:
    """Spool the file and commit its queued Instance row; return the row and whether it was a duplicate.

    An instance whose SOP Instance UID and content hash (SHA-256 of the dataset bytes, file
    meta excluded) were stored before is a duplicate and is not stored again. One with the
    same UID but other content is stored too, with ``conflicts_with_id`` naming the first.
    """
    digest = hashlib.sha256(parsed.dataset_bytes).hexdigest()
    size = len(parsed.file_prefix) + len(parsed.dataset_bytes)
    received_at = utcnow()
    relative_path = spool.spool_relative_path(parsed.sop_instance_uid, digest, received_at)

    with context.session_factory() as session:
        earlier = instances_with_uid(session, parsed.sop_instance_uid)
        for instance in earlier:
            if instance.sha256 == digest:
                return instance, True

    try:
        spool.write_durably(context.data_dir / relative_path, (parsed.file_prefix, parsed.dataset_bytes))
    except OSError as err:
        raise StoreRejected(STATUS_OUT_OF_RESOURCES, f"writing {relative_path} failed: {err}") from err

    # Another association may have stored the same instance while this one was writing, so
    # the check is repeated. The lock keeps that check and the insert together.
    with context.lock, context.session_factory() as session:
        earlier = instances_with_uid(session, parsed.sop_instance_uid)
        for instance in earlier:
            if instance.sha256 == digest:
                if instance.path != relative_path.as_posix():
                    (context.data_dir / relative_path).unlink(missing_ok=True)
                return instance, True

        instance = Instance(
            sop_instance_uid=parsed.sop_instance_uid,
            sop_class_uid=parsed.sop_class_uid,
            study_instance_uid=parsed.study_instance_uid,
            series_instance_uid=parsed.series_instance_uid,
            transfer_syntax_uid=parsed.transfer_syntax_uid,
            calling_ae_title=parsed.calling_ae_title,
            path=relative_path.as_posix(),
            sha256=digest,
            size=size,
            state="queued",
            attempts=0,
            conflicts_with_id=earlier[0].id if earlier else None,
            received_at=received_at,
        )
        session.add(instance)
        if parsed.study_instance_uid:
            studies.note_instance(session, parsed.study_instance_uid, received_at)
        try:
            session.commit()
        except IntegrityError:
            # Another process stored the same content first; its row names this same file.
            session.rollback()
            return instance, True
        except SQLAlchemyError as err:
            session.rollback()
            (context.data_dir / relative_path).unlink(missing_ok=True)
            raise StoreRejected(STATUS_OUT_OF_RESOURCES, f"recording the instance failed: {err}") from err
        if instance.conflicts_with_id:
            logger.warning(
                "SOP Instance UID %s was received before with other content (instance %d); keeping both",
                parsed.sop_instance_uid,
                instance.conflicts_with_id,
            )
        return instance, False


def instances_with_uid(session: Session, sop_instance_uid: str) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Instance.id)
        ).all()
    )


def handle_rejected(event: Event) -> None:
    logger.warning(
        "Association from AE %r at %s:%s rejected",
        event.assoc.requestor.ae_title,
        event.assoc.requestor.address,
        event.assoc.requestor.port,
    )


def build_ae(settings: DicomSettings, transfer_syntaxes: list[UID] | None = None) -> AE:
    """Build an AE that accepts Verification and the storage SOP classes in every decodable syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    # A study of several views may arrive over parallel associations.
    ae.maximum_associations = 16

    syntaxes = transfer_syntaxes if transfer_syntaxes is not None else decodable_transfer_syntaxes()
    ae.add_supported_context(sop_classes.Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def start_server(ae: AE, settings: DicomSettings, context: StoreContext) -> ThreadedAssociationServer:
    """Start listening without blocking; stop with ``server.shutdown()``."""
    handlers = [
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_REJECTED, handle_rejected),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    if server is None:
        raise RuntimeError(f"the association server on {settings.host}:{settings.port} did not start")
    return server


def wait_for_associations(ae: AE, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for open associations to end, abort the rest; return how many were aborted."""
    deadline = time.monotonic() + timeout
    while ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = ae.active_associations
    for assoc in remaining:
        assoc.abort()
    if remaining:
        logger.warning("Aborted %d associations still open at shutdown", len(remaining))
    return len(remaining)


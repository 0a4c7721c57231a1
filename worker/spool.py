"""Durable files: received instances in the spool, written through a temporary file.

A file written here survives a crash or power loss once the call returns. The data goes
to a temporary file in the target directory, which is flushed, fsync'ed and renamed over
the final name. Then the directory itself is fsync'ed so that the rename is on disk too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"
TEMPORARY_PREFIX = ".partial-"
# DICOM PS3.5 section 9.1: digit components separated by dots, at most 64 characters.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not digits and dots, so it must not become part of a file name."""


def check_uid(uid: object, keyword: str = "SOPInstanceUID") -> str:
    """Return ``uid`` as a string when it is made of digits and dots, at most 64 characters."""
    text = str(uid) if uid is not None else ""
    if not UID_PATTERN.match(text) or len(text) > 64:
        raise InvalidUID(f"{keyword} {text!r} is not a valid UID: expected 1 to 64 characters of digits and dots")
    return text


def spool_relative_path(sop_instance_uid: str, sha256: str, received_at: dt.datetime) -> Path:
    """Path of a received instance relative to the data directory.

    The file name contains the start of the content hash, so two instances with the same
    SOP Instance UID but other content get two files.
    """
    check_uid(sop_instance_uid)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"sha256 {sha256!r} is not 64 lower-case hexadecimal digits")
    return Path(SPOOL_DIRNAME) / received_at.strftime("%Y-%m-%d") / f"{sop_instance_uid}_{sha256[:16]}.dcm"


def free_disk_bytes(path: Path) -> int:
    """Free space for unprivileged users on the file system holding ``path``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(directory: Path) -> None:
    """Create ``directory`` and any missing parents, fsync'ing each parent after a creation."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_directory(folder.parent)


def write_durably(path: Path, chunks: list[bytes] | tuple[bytes, ...]) -> None:
    """Write ``chunks`` to ``path`` atomically and durably (temporary file, fsync, rename, fsync)."""
    make_directories(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_temporary_files(directory: Path) -> int:
    """Delete temporary files that an interrupted write left under ``directory``."""
    removed = 0
    if not directory.is_dir():
        return removed
    for path in directory.rglob(f"{TEMPORARY_PREFIX}*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        logger.warning("Removed %d temporary files left by an interrupted write under %s", removed, directory)
    return removed

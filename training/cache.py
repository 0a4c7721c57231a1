"""Preprocess a data source once into an array file that later runs load directly.

The cache is ``<cache_dir>/<PREPROCESSING_VERSION>-<size>-<key>.npy`` (float32,
N x size x size) with a JSON file of the same stem. The key hashes the preprocessing
version, the output size and each file's path, size, modification time, laterality
and view position, so a change to any of them builds a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from model.preprocess import OUTPUT_SIZE, PREPROCESSING_VERSION, PreprocessedView, preprocess_dataset, preprocess_file
from training.data import ImageRecord

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mammo-vae-cache/1"


@dataclass
class CachedImages:
    """Preprocessed images of the records that preprocessing accepted.

    ``images[i]`` belongs to ``records[indices[i]]``, the record list passed to
    :func:`load_or_build_cache`. ``failures`` maps the index of each rejected record
    to the error message.
    """

    images: np.ndarray  # float32 (N, size, size) in [0, 1]
    indices: list[int]
    views: list[tuple[str | None, str | None]]  # (laterality, view position) as preprocessing found them
    failures: dict[int, str]
    path: Path
    hit: bool  # True when the images were read from an existing cache file
    seconds: float

    def position_of(self) -> dict[int, int]:
        """Map a record index to its row in ``images``."""
        return {record_index: row for row, record_index in enumerate(self.indices)}

    def select(self, record_indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Images of the given records that preprocessing accepted, and their record indices."""
        rows = self.position_of()
        kept = [index for index in record_indices if index in rows]
        return self.images[[rows[index] for index in kept]], kept

    def view_of(self, record_index: int) -> tuple[str | None, str | None]:
        """Laterality and view position of a record as preprocessing found them."""
        return self.views[self.position_of()[record_index]]


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # sched_getaffinity exists on Linux only
        return max(1, os.cpu_count() or 1)


def cache_key(records: Sequence[ImageRecord], size: int) -> str:
    """First 16 hex digits of a SHA-256 over the preprocessing version and the file list."""
    digest = hashlib.sha256()
    digest.update(f"{PREPROCESSING_VERSION}\n{size}\n".encode())
    for record in records:
        path = Path(record.path).resolve()
        stat = path.stat()
        line = f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\t{record.laterality}\t{record.view_position}\n"
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def cache_paths(cache_dir: Path, key: str, size: int) -> tuple[Path, Path]:
    stem = f"{PREPROCESSING_VERSION}-{size}-{key}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


_Result = tuple[int, np.ndarray | None, tuple[str | None, str | None], str | None]
DICOM_SUFFIXES = (".dcm", ".dicom")


def preprocess_path(path: str | Path, laterality: str | None, view_position: str | None, size: int) -> PreprocessedView:
    """Preprocess a DICOM file with its own header, or an image file with the given labels.

    DICOM files are those ending in .dcm or .dicom. Their laterality and view
    position come from the header, as when the worker receives them.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return preprocess_dataset(pydicom.dcmread(path), size=size)
    return preprocess_file(path, laterality=laterality, view_position=view_position, size=size)


def _preprocess_one(task: tuple[int, str, str | None, str | None, int]) -> _Result:
    """Preprocess one file in a worker process.

    Returns the record index, the image (None on failure), the laterality and view
    position that preprocessing settled on, and the error message on failure.
    """
    index, path, laterality, view_position, size = task
    try:
        view = preprocess_path(path, laterality, view_position, size)
    except (ValueError, OSError, InvalidDicomError) as err:
        # PreprocessingError and UnsupportedView are ValueErrors.
        return index, None, (laterality, view_position), f"{type(err).__name__}: {err}"
    metadata = view.metadata
    return index, np.asarray(view.image, dtype=np.float32), (metadata.laterality, metadata.view_position), None


def preprocess_records(
    records: Sequence[ImageRecord], size: int = OUTPUT_SIZE, threads: int = 1
) -> tuple[np.ndarray, list[int], list[tuple[str | None, str | None]], dict[int, str]]:
    """Run every record through ``model.preprocess`` with :func:`preprocess_path`.

    With ``threads`` > 1 the files are spread over that many worker processes. They
    are forked where the platform allows it, because forking starts fast and needs no
    ``__main__`` guard in the calling script. The workers run NumPy, Pillow and
    pydicom code only, never PyTorch operations.
    """
    tasks = [
        (index, str(record.path), record.laterality, record.view_position, size)
        for index, record in enumerate(records)
    ]
    if threads > 1 and len(tasks) > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        chunk = max(1, len(tasks) // (threads * 4))
        with ProcessPoolExecutor(max_workers=min(threads, len(tasks)), mp_context=context) as pool:
            results = list(pool.map(_preprocess_one, tasks, chunksize=chunk))
    else:
        results = [_preprocess_one(task) for task in tasks]

    images = np.empty((len(tasks), size, size), dtype=np.float32)
    indices: list[int] = []
    views: list[tuple[str | None, str | None]] = []
    failures: dict[int, str] = {}
    for index, image, view, error in results:
        if image is None:
            failures[index] = error or "unknown error"
            continue
        if image.shape != (size, size):
            failures[index] = f"preprocessing returned shape {image.shape}, expected {(size, size)}"
            continue
        images[len(indices)] = image
        indices.append(index)
        views.append(view)
    return images[: len(indices)], indices, views, failures


def _write_atomically(path: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_cache(array_path: Path, meta_path: Path, count: int) -> tuple[np.ndarray, list[int], list, dict[int, str]] | None:
    """Read a cache written by :func:`load_or_build_cache`, or return None if it is unusable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        images = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("cache %s could not be read (%s); preprocessing again", array_path, err)
        return None
    indices = [int(index) for index in meta.get("indices", [])]
    views = [(view[0], view[1]) for view in meta.get("views", [])]
    if (
        meta.get("format") != CACHE_FORMAT
        or meta.get("preprocessing_version") != PREPROCESSING_VERSION
        or meta.get("records") != count
        or images.dtype != np.float32
        or images.shape[0] != len(indices)
        or len(views) != len(indices)
    ):
        logger.warning("cache %s does not match its metadata; preprocessing again", array_path)
        return None
    failures = {int(index): message for index, message in meta.get("failures", {}).items()}
    return images, indices, views, failures


def load_or_build_cache(
    records: Sequence[ImageRecord],
    cache_dir: str | Path,
    size: int = OUTPUT_SIZE,
    threads: int = 1,
) -> CachedImages:
    """Return the preprocessed images of ``records``, preprocessing only on a cache miss.

    Records that preprocessing rejects are left out and logged once with a count.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(records, size)
    array_path, meta_path = cache_paths(cache_dir, key, size)

    if array_path.is_file() and meta_path.is_file():
        cached = _read_cache(array_path, meta_path, len(records))
        if cached is not None:
            images, indices, views, failures = cached
            seconds = time.perf_counter() - started
            logger.info("loaded %d preprocessed images from cache %s in %.1f s", len(indices), array_path, seconds)
            return CachedImages(images, indices, views, failures, array_path, hit=True, seconds=seconds)

    logger.info("preprocessing %d images with %d processes into %s", len(records), threads, cache_dir)
    images, indices, views, failures = preprocess_records(records, size=size, threads=threads)
    if failures:
        logger.warning(
            "%d of %d images were rejected by preprocessing, first: %s",
            len(failures),
            len(records),
            next(iter(failures.values())),
        )
    _write_atomically(array_path, lambda stream: np.save(stream, images, allow_pickle=False))
    meta = {
        "format": CACHE_FORMAT,
        "preprocessing_version": PREPROCESSING_VERSION,
        "size": size,
        "records": len(records),
        "indices": indices,
        "views": [list(view) for view in views],
        "failures": {str(index): message for index, message in failures.items()},
        "image_ids": [records[index].image_id for index in indices],
    }
    _write_atomically(meta_path, lambda stream: stream.write(json.dumps(meta).encode()))
    seconds = time.perf_counter() - started
    logger.info("preprocessed %d images in %.1f s", len(indices), seconds)
    return CachedImages(images, indices, views, failures, array_path, hit=False, seconds=seconds)

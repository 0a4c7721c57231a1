"""The one preprocessing path shared by training and the worker.

From a pydicom Dataset or an image file to a float32 128x128 array in [0, 1] plus the
metadata that says how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

# Stored in checkpoints and result rows; change it whenever the output of
# preprocess_* changes for the same input.
PREPROCESSING_VERSION = "mammo-pre-1"
OUTPUT_SIZE = 128


class PreprocessingError(ValueError):
    """The input cannot be turned into a view (undecodable or inconsistent pixel data)."""


class UnsupportedView(ValueError):
    """The input is valid but is not a view the model scores (For Processing, ML view, ...)."""


@dataclass(frozen=True)
class ViewMetadata:
    laterality: str | None  # "L", "R" or None
    view_position: str | None  # "CC", "MLO" or None
    flipped: bool  # True when the image was mirrored to put the chest wall on the left
    crop_box: tuple[int, int, int, int]  # (row0, col0, row1, col1) in source pixels, end exclusive
    source_shape: tuple[int, int]
    preprocessing_version: str = PREPROCESSING_VERSION
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class PreprocessedView:
    image: np.ndarray  # float32, (OUTPUT_SIZE, OUTPUT_SIZE), values in [0, 1]
    metadata: ViewMetadata


def check_scorable(ds: pydicom.Dataset) -> None:
    """Raise UnsupportedView when the header alone shows the dataset must not be scored."""
    raise NotImplementedError


def preprocess_dataset(
    ds: pydicom.Dataset, size: int = OUTPUT_SIZE, timings: dict[str, float] | None = None
) -> PreprocessedView:
    """``timings``, when given, receives ``decode_ms`` and ``preprocess_ms``."""
    raise NotImplementedError


def preprocess_file(
    path: str | Path,
    laterality: str | None = None,
    view_position: str | None = None,
    size: int = OUTPUT_SIZE,
) -> PreprocessedView:
    raise NotImplementedError

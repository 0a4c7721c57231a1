"""Full-field test studies: mini-MIAS films scaled up to 4096 x 3328 pixels at 12 bits.

Every view is built from a real mini-MIAS film in a real GE Senographe header by the test
factory (tests/dicom_factory.py). The film is cut to the 832 columns at its chest-wall
side and scaled up four times with bilinear interpolation. Seeded Gaussian noise in the
breast keeps JPEG 2000 lossless from compressing the smooth upscale far more than a
detector image: a view shrinks from 27 MB to about 8.5 MB. The same arguments always
give the same pixels.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_FIELD_SHAPE = (4096, 3328)
BITS_STORED = 12
# Standard deviation of the added noise, in 12-bit stored values.
NOISE_STD = 16.0
# Columns of the 1024-column film kept at its chest-wall side; 832 x 4 = 3328.
KEPT_FILM_COLUMNS = FULL_FIELD_SHAPE[1] // 4
ENCODINGS = ("jpeg2000", "uncompressed")


@cache
def dicom_factory() -> ModuleType:
    """Import tests/dicom_factory.py by path: tests/ is not a package."""
    path = REPO_ROOT / "tests" / "dicom_factory.py"
    spec = importlib.util.spec_from_file_location("dicom_factory", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the test factory from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dicom_factory", module)
    spec.loader.exec_module(module)
    return module


def full_field_pixels(film: int, laterality: str, shape: tuple[int, int] = FULL_FIELD_SHAPE) -> np.ndarray:
    """Return film ``mdbNNN`` as uint16 stored values of ``shape`` at 12 bits, padding 0.

    ``shape`` is (4 * 1024, 4 * 832) for full-field views; smaller shapes scale the same
    cut of the film, for quick runs.
    """
    factory = dicom_factory()
    film8 = factory.load_mias(film)
    kept = film8[:, :KEPT_FILM_COLUMNS] if laterality == "L" else film8[:, -KEPT_FILM_COLUMNS:]
    scaled = Image.fromarray(kept.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    values = np.asarray(scaled, dtype=np.float32) * np.float32(((1 << BITS_STORED) - 1) / 255.0)
    tissue = values > 0.0
    rng = np.random.default_rng(film)
    values[tissue] += rng.normal(0.0, NOISE_STD, int(tissue.sum())).astype(np.float32)
    # Noise must not turn tissue into padding (0) or pass the 12-bit range.
    np.clip(values, 0.0, (1 << BITS_STORED) - 1, out=values)
    values[tissue] = np.maximum(values[tissue], 1.0)
    return np.rint(values).astype(np.uint16)


def full_field_view(
    film: int, laterality: str, view_position: str, study_key: str, encoding: str, shape: tuple[int, int] = FULL_FIELD_SHAPE
) -> Dataset:
    """Build one view as a Digital Mammography For Presentation object, JPEG 2000 lossless or uncompressed."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding is {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    factory = dicom_factory()
    pixels = full_field_pixels(film, laterality, shape)
    ds = factory.make_mammogram(pixels, laterality, view_position, study_key=study_key, bits_stored=BITS_STORED)
    if encoding == "jpeg2000":
        ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


@dataclass(frozen=True)
class StudyFiles:
    encoding: str
    paths: list[Path]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


def write_full_field_study(
    folder: Path, study_key: str, encoding: str, shape: tuple[int, int] = FULL_FIELD_SHAPE
) -> StudyFiles:
    """Write the four standard views of a study as Part 10 files under ``folder``; reuse existing ones.

    The views use the factory's DEFAULT_FOUR_VIEWS films; mini-MIAS has MLO films only,
    so the CC views are MLO films labelled CC.
    """
    factory = dicom_factory()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (laterality, view_position), film in factory.DEFAULT_FOUR_VIEWS.items():
        path = folder / f"{study_key}-{encoding}-{laterality}{view_position}-{shape[0]}x{shape[1]}.dcm"
        if not path.is_file():
            ds = full_field_view(film, laterality, view_position, study_key, encoding, shape)
            temporary = path.with_suffix(".partial")
            ds.save_as(temporary, enforce_file_format=True)
            temporary.replace(path)
            logger.info("wrote %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
        paths.append(path)
    return StudyFiles(encoding, paths)


def read_view(path: Path) -> Dataset:
    return pydicom.dcmread(path)

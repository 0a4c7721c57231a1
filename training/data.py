"""Training data sources and patient-level splits.

Three sources yield :class:`ImageRecord` lists: the mini-MIAS folder, a VinDr-Mammo
annotation CSV with its DICOM or PNG images, and a plain folder of healthy images.
:func:`make_split` then assigns whole patients to train, validation and test.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

logger = logging.getLogger(__name__)

DataFormat = Literal["mini-mias", "vindr", "folder"]
DATA_FORMATS: tuple[str, ...] = ("mini-mias", "vindr", "folder")
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.6, "validation": 0.15, "test": 0.25}

HEALTHY = "healthy"
ABNORMAL = "abnormal"

# mini-MIAS abnormality classes as written in Info.txt, and the label of normal films.
MIAS_CLASSES: tuple[str, ...] = ("CALC", "CIRC", "SPIC", "ARCH", "ASYM", "MISC")
MIAS_NORMAL = "NORM"
MIAS_INFO_NAME = "Info.txt"
_MIAS_ROW = re.compile(r"^(mdb\d{3})\s+([FGD])\s+([A-Z]{4})\b\s*(.*)$")
_MIAS_FILE = re.compile(r"^(mdb\d{3})\.pgm(\.gz)?$")

VINDR_NO_FINDING = "No Finding"
VINDR_REQUIRED_COLUMNS: tuple[str, ...] = ("study_id", "image_id", "laterality", "view_position")
VINDR_IMAGE_SUFFIXES: tuple[str, ...] = (".dicom", ".dcm", ".png")

FOLDER_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".pgm.gz",
)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data source with the labels that training and evaluation use."""

    image_id: str
    path: Path
    patient_id: str
    laterality: str | None  # "L", "R" or None when the image header has to say
    view_position: str | None  # "CC", "MLO" or None
    label: Literal["healthy", "abnormal"]
    abnormality_classes: tuple[str, ...] = ()
    tissue: str | None = None  # mini-MIAS background tissue F/G/D, VinDr breast density
    source_split: str | None = None  # the split column of a VinDr CSV

    @property
    def healthy(self) -> bool:
        return self.label == HEALTHY


# mini-MIAS ------------------------------------------------------------------


@dataclass(frozen=True)
class MiasRow:
    """One row of the mini-MIAS Info.txt list; an image may have several."""

    film: str
    tissue: str
    abnormality_class: str
    severity: str | None


def read_mias_info(path: str | Path) -> dict[str, list[MiasRow]]:
    """Parse the mini-MIAS ground-truth list into rows per film (``mdbNNN``).

    Lines that do not start with a film reference (the README text around the list)
    are skipped. Centre and radius columns are not needed here and are dropped.
    """
    rows: dict[str, list[MiasRow]] = {}
    text = Path(path).read_text(encoding="latin-1")
    for line in text.splitlines():
        match = _MIAS_ROW.match(line.strip())
        if match is None:
            continue
        film, tissue, abnormality_class, rest = match.groups()
        if abnormality_class != MIAS_NORMAL and abnormality_class not in MIAS_CLASSES:
            raise ValueError(
                f"{path}: film {film} has class {abnormality_class!r}; "
                f"expected {MIAS_NORMAL} or one of {list(MIAS_CLASSES)}"
            )
        fields = rest.split()
        severity = fields[0] if fields and fields[0] in ("B", "M") else None
        rows.setdefault(film, []).append(MiasRow(film, tissue, abnormality_class, severity))
    if not rows:
        raise ValueError(f"{path} contains no mini-MIAS rows such as 'mdb001 G CIRC B 535 425 197'")
    return rows


def mias_patient_id(film: str) -> str:
    """Films ``mdb(2k-1)`` and ``mdb(2k)`` are the two breasts of woman ``k``."""
    number = int(film[3:])
    return f"mias-{(number + 1) // 2:03d}"


def mias_laterality(film: str) -> str:
    """Even film numbers are left breasts, odd numbers right (MIAS README, note 1)."""
    return "L" if int(film[3:]) % 2 == 0 else "R"


def find_mias_images(folder: Path) -> dict[str, Path]:
    """Map each film to its ``.pgm`` or ``.pgm.gz`` file in ``folder/images`` or ``folder``."""
    found: dict[str, Path] = {}
    for directory in (folder / "images", folder):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            match = _MIAS_FILE.match(path.name)
            if match is not None and path.is_file():
                found.setdefault(match.group(1), path)
    return found


def mias_records(folder: str | Path) -> list[ImageRecord]:
    """Records of the mini-MIAS films in ``folder``, labelled from its Info.txt.

    A film is healthy when its only row is ``NORM``. All mini-MIAS views are MLO.
    Films listed in Info.txt without an image file, and image files without a row,
    are skipped with a warning.
    """
    folder = Path(folder)
    info_path = folder / MIAS_INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found; --data must be the mini-MIAS folder holding {MIAS_INFO_NAME}")
    info = read_mias_info(info_path)
    images = find_mias_images(folder)

    missing = sorted(set(info) - set(images))
    if missing:
        logger.warning("%d films listed in %s have no image file and are skipped", len(missing), info_path)
    unlabelled = sorted(set(images) - set(info))
    if unlabelled:
        logger.warning("%d image files have no row in %s and are skipped", len(unlabelled), info_path)

    records = []
    for film in sorted(set(info) & set(images)):
        rows = info[film]
        classes = tuple(sorted({row.abnormality_class for row in rows if row.abnormality_class != MIAS_NORMAL}))
        records.append(
            ImageRecord(
                image_id=film,
                path=images[film],
                patient_id=mias_patient_id(film),
                laterality=mias_laterality(film),
                view_position="MLO",
                label=ABNORMAL if classes else HEALTHY,
                abnormality_classes=classes,
                tissue=rows[0].tissue,
            )
        )
    if not records:
        raise ValueError(f"no mini-MIAS film in {folder} has both an image file and a row in {MIAS_INFO_NAME}")
    return records


# VinDr-Mammo ----------------------------------------------------------------


def parse_finding_categories(value: Any) -> tuple[str, ...]:
    """Parse a VinDr ``finding_categories`` cell such as ``"['Mass', 'Suspicious Calcification']"``."""
    if isinstance(value, float) and math.isnan(value):
        return ()
    text = str(value).strip()
    if not text:
        return ()
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"finding_categories {text!r} is not a Python list literal such as \"['No Finding']\"") from err
    if isinstance(parsed, str):
        parsed = [parsed]
    return tuple(str(item).strip() for item in parsed)


def find_vindr_image(image_root: Path, study_id: str, image_id: str) -> Path | None:
    for suffix in VINDR_IMAGE_SUFFIXES:
        path = image_root / study_id / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def resolve_vindr_paths(data: str | Path, image_root: str | Path | None = None) -> tuple[Path, Path]:
    """Return the annotation CSV and the image root for ``--data``.

    ``data`` is the CSV itself, or a folder holding ``finding_annotations.csv`` (the
    VinDr-Mammo name) or exactly one CSV. Images are looked up under ``image_root``,
    else under ``images/`` beside the CSV, else beside the CSV.
    """
    data = Path(data)
    if data.is_dir():
        preferred = data / "finding_annotations.csv"
        candidates = [preferred] if preferred.is_file() else sorted(data.glob("*.csv"))
        if len(candidates) != 1:
            raise ValueError(
                f"{data} contains {len(candidates)} CSV files, expected one; pass the annotation CSV itself as --data"
            )
        csv_path = candidates[0]
    elif data.is_file():
        csv_path = data
    else:
        raise FileNotFoundError(f"VinDr annotation CSV or folder {data} not found")
    if image_root is not None:
        root = Path(image_root)
    elif (csv_path.parent / "images").is_dir():
        root = csv_path.parent / "images"
    else:
        root = csv_path.parent
    return csv_path, root


def vindr_records(
    data: str | Path,
    image_root: str | Path | None = None,
    views: Iterable[str] | None = None,
    split: str | None = None,
) -> list[ImageRecord]:
    """Records of a VinDr-Mammo annotation CSV with one or more rows per image.

    An image is healthy when it has no finding: the ``Health`` column is 0 where the
    CSV has one, else every row's ``finding_categories`` is ``['No Finding']``.
    Images are ``<root>/<study_id>/<image_id>.dicom`` (or ``.dcm``, ``.png``); rows
    without an image file are skipped with a warning. ``views`` keeps only those view
    positions and ``split`` only rows of that ``split`` value (``training``, ``test``).
    The study is the patient: VinDr-Mammo publishes no patient identifier.
    """
    csv_path, root = resolve_vindr_paths(data, image_root)
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing_columns = [column for column in VINDR_REQUIRED_COLUMNS if column not in table.columns]
    if missing_columns:
        raise ValueError(f"{csv_path} lacks the columns {missing_columns}; found {list(table.columns)}")
    has_health = "Health" in table.columns
    if not has_health and "finding_categories" not in table.columns:
        raise ValueError(f"{csv_path} has neither a 'Health' nor a 'finding_categories' column to label images")

    if views is not None:
        wanted = {view.upper() for view in views}
        table = table[table["view_position"].str.upper().isin(wanted)]
    if split is not None:
        if "split" not in table.columns:
            raise ValueError(f"{csv_path} has no 'split' column, so split={split!r} cannot be applied")
        table = table[table["split"] == split]

    records = []
    without_file = 0
    for image_id, rows in table.groupby("image_id", sort=True):
        first = rows.iloc[0]
        study_id = str(first["study_id"])
        path = find_vindr_image(root, study_id, str(image_id))
        if path is None:
            without_file += 1
            continue
        categories = sorted(
            {
                category
                for cell in rows.get("finding_categories", pd.Series(dtype=str))
                for category in parse_finding_categories(cell)
                if category != VINDR_NO_FINDING
            }
        )
        if has_health:
            healthy = all(_parse_health(value, csv_path) == 0 for value in rows["Health"])
        else:
            healthy = not categories
        records.append(
            ImageRecord(
                image_id=str(image_id),
                path=path,
                patient_id=study_id,
                laterality=str(first["laterality"]).upper() or None,
                view_position=str(first["view_position"]).upper() or None,
                label=HEALTHY if healthy else ABNORMAL,
                abnormality_classes=() if healthy else tuple(categories),
                tissue=str(first.get("breast_density", "")) or None,
                source_split=str(first.get("split", "")) or None,
            )
        )
    if without_file:
        logger.warning("%d images of %s have no file under %s and are skipped", without_file, csv_path, root)
    if not records:
        raise ValueError(f"no image of {csv_path} was found under {root} as <study_id>/<image_id>.dicom or .png")
    return records


def _parse_health(value: str, csv_path: Path) -> int:
    try:
        return int(float(value))
    except ValueError as err:
        raise ValueError(f"{csv_path}: Health value {value!r} is not 0 (no finding) or 1") from err


# Plain folder -----------------------------------------------------------------


def _has_image_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in FOLDER_IMAGE_SUFFIXES)


def folder_records(folder: str | Path) -> list[ImageRecord]:
    """Records of every image below ``folder``, all labelled healthy.

    An image in a subfolder belongs to the patient named by its first-level subfolder
    (one folder per patient). An image directly in ``folder`` is its own patient.
    Laterality and view position come from the DICOM header during preprocessing and
    stay unknown for other image files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    records = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or not _has_image_suffix(path):
            continue
        relative = path.relative_to(folder)
        patient = relative.parts[0] if len(relative.parts) > 1 else relative.name
        records.append(
            ImageRecord(
                image_id=relative.as_posix(),
                path=path,
                patient_id=patient,
                laterality=None,
                view_position=None,
                label=HEALTHY,
            )
        )
    if not records:
        raise ValueError(f"{folder} contains no image file ending in one of {list(FOLDER_IMAGE_SUFFIXES)}")
    return records


def load_records(
    data_format: str,
    data: str | Path,
    *,
    views: Iterable[str] | None = None,
    vindr_split: str | None = None,
) -> list[ImageRecord]:
    """Records of one data source; ``views`` and ``vindr_split`` apply to VinDr only."""
    if data_format == "mini-mias":
        records = mias_records(data)
    elif data_format == "vindr":
        records = vindr_records(data, views=views, split=vindr_split)
    elif data_format == "folder":
        records = folder_records(data)
    else:
        raise ValueError(f"data format {data_format!r} is not one of {list(DATA_FORMATS)}")
    logger.info(
        "%s: %d images of %d patients (%d healthy)",
        data_format,
        len(records),
        len({record.patient_id for record in records}),
        sum(record.healthy for record in records),
    )
    return records


# Patient-level split ------------------------------------------------------------


@dataclass
class PatientSplit:
    """Patients of each split, fixed by ``seed``; stored as JSON and in the checkpoint."""

    train: list[str]
    validation: list[str]
    test: list[str]
    seed: int
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    data_format: str | None = None

    def name_of(self, patient_id: str) -> str | None:
        """Return the split that holds ``patient_id``, or None."""
        for name in SPLIT_NAMES:
            if patient_id in self._sets()[name]:
                return name
        return None

    def _sets(self) -> dict[str, set[str]]:
        return {name: set(getattr(self, name)) for name in SPLIT_NAMES}

    def select(self, records: Sequence[ImageRecord], name: str, healthy_only: bool = False) -> list[int]:
        """Indices of ``records`` whose patient is in split ``name``."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split {name!r} is not one of {list(SPLIT_NAMES)}")
        patients = self._sets()[name]
        return [
            index
            for index, record in enumerate(records)
            if record.patient_id in patients and (record.healthy or not healthy_only)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "data_format": self.data_format,
            "train": list(self.train),
            "validation": list(self.validation),
            "test": list(self.test),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PatientSplit:
        missing = [key for key in (*SPLIT_NAMES, "seed") if key not in values]
        if missing:
            raise ValueError(f"split lacks the keys {missing}; it was not written by training.fit")
        return cls(
            train=list(values["train"]),
            validation=list(values["validation"]),
            test=list(values["test"]),
            seed=int(values["seed"]),
            fractions=dict(values.get("fractions") or DEFAULT_FRACTIONS),
            data_format=values.get("data_format"),
        )

    def write_json(self, path: str | Path, records: Sequence[ImageRecord] | None = None) -> Path:
        """Write the split, with image counts per split when ``records`` are given."""
        payload = self.to_dict()
        if records is not None:
            payload["counts"] = split_counts(self, records)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        return path


def split_counts(split: PatientSplit, records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """Patients, healthy images and abnormal images in each split."""
    counts = {}
    for name in SPLIT_NAMES:
        chosen = [records[index] for index in split.select(records, name)]
        counts[name] = {
            "patients": len(getattr(split, name)),
            "healthy_images": sum(record.healthy for record in chosen),
            "abnormal_images": sum(not record.healthy for record in chosen),
        }
    return counts


def _patient_stratum(labels: list[bool]) -> int:
    """0: all images healthy, 1: healthy and abnormal images, 2: all abnormal."""
    if all(labels):
        return 0
    return 2 if not any(labels) else 1


def _target_sizes(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Patients per split: at least one each for validation and test when there are three or more."""
    test = round(total * fractions["test"])
    validation = round(total * fractions["validation"])
    if total >= 3:
        test = max(test, 1) if fractions["test"] > 0 else 0
        validation = max(validation, 1) if fractions["validation"] > 0 else 0
    train = total - test - validation
    if train < 1:
        raise ValueError(
            f"{total} patients leave none for training with fractions {fractions}; "
            "use more patients or smaller validation and test fractions"
        )
    return {"train": train, "validation": validation, "test": test}


def make_split(
    records: Sequence[ImageRecord],
    seed: int,
    fractions: dict[str, float] | None = None,
    data_format: str | None = None,
) -> PatientSplit:
    """Assign whole patients to train, validation and test, fixed by ``seed``.

    Patients are grouped by whether their images are all healthy, mixed or all
    abnormal, shuffled within each group, and dealt to the splits evenly along that
    order, so every split gets about its fraction of each group. All images of a
    patient, normal and abnormal, land in the same split.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    if set(fractions) != set(SPLIT_NAMES):
        raise ValueError(f"fractions {fractions} must have exactly the keys {list(SPLIT_NAMES)}")
    if any(value < 0 for value in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"fractions {fractions} must be non-negative and sum to 1")

    labels: dict[str, list[bool]] = {}
    for record in records:
        labels.setdefault(record.patient_id, []).append(record.healthy)
    if not labels:
        raise ValueError("cannot split zero records")

    rng = random.Random(seed)
    strata: dict[int, list[str]] = {}
    for patient in sorted(labels):
        strata.setdefault(_patient_stratum(labels[patient]), []).append(patient)
    ordered: list[str] = []
    for stratum in sorted(strata):
        patients = strata[stratum]
        rng.shuffle(patients)
        ordered.extend(patients)

    # Deal each position to the split lagging furthest behind its target share of the
    # positions seen so far; this spreads every split evenly over all strata.
    targets = _target_sizes(len(ordered), fractions)
    assigned: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for position, patient in enumerate(ordered, start=1):
        name = max(
            (name for name in SPLIT_NAMES if len(assigned[name]) < targets[name]),
            key=lambda candidate: targets[candidate] * position / len(ordered) - len(assigned[candidate]),
        )
        assigned[name].append(patient)

    return PatientSplit(
        train=sorted(assigned["train"]),
        validation=sorted(assigned["validation"]),
        test=sorted(assigned["test"]),
        seed=seed,
        fractions=fractions,
        data_format=data_format,
    )

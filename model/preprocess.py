"""The one preprocessing path shared by training and the worker.

From a pydicom Dataset or an image file to a float32 128x128 array in [0, 1] plus the
metadata that describes how it was made. Both entry points end in ``preprocess_array``, so a
film read from a file and the same pixels received as DICOM give the same array.
See docs/preprocessing.md for each step and the decisions behind it.
"""

from __future__ import annotations

import gzip
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from model import breast
from model.dicom_pixels import PixelDataError, decode_stored_values, display_from_stored, find_attribute

logger = logging.getLogger(__name__)

# Stored in checkpoints and result rows; change it whenever the output of
# preprocess_* changes for the same input.
PREPROCESSING_VERSION = "mammo-pre-1"
OUTPUT_SIZE = 128
# Smallest Rows and Columns scored; smaller objects are test or icon images.
MIN_IMAGE_SIZE = 64

MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"
BREAST_PROJECTION_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.13.1.5": "Breast Projection X-Ray Image Storage - For Processing",
}
# SOP classes scored; the general X-ray classes only when the header says breast.
ACCEPTED_SOP_CLASSES = {
    MAMMOGRAPHY_FOR_PRESENTATION: "Digital Mammography X-Ray Image Storage - For Presentation",
    DIGITAL_XRAY_FOR_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    COMPUTED_RADIOGRAPHY: "Computed Radiography Image Storage",
    BREAST_PROJECTION_FOR_PRESENTATION: "Breast Projection X-Ray Image Storage - For Presentation",
}
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"

VIEW_POSITIONS = ("CC", "MLO")
# (Coding Scheme Designator, Code Value) -> View Position, from DICOM CID 4014.
VIEW_CODES = {
    ("SRT", "R-10242"): "CC",
    ("SNM3", "R-10242"): "CC",
    ("SCT", "399162004"): "CC",
    ("SRT", "R-10226"): "MLO",
    ("SNM3", "R-10226"): "MLO",
    ("SCT", "399368009"): "MLO",
}
LATERALITIES = ("L", "R")


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
    # Edge of the stored image that held the chest wall: "left", "right", "top" or "bottom".
    # model.breast.oriented_view turned the image to put it on the left.
    chest_wall: str = "left"
    # True when rows were also mirrored top-bottom to follow the Patient Orientation convention.
    flipped_vertical: bool = False
    # Which VOI step made the display values: "VOI LUT Sequence", "window", "fallback", "file".
    voi_source: str = ""


@dataclass(frozen=True)
class PreprocessedView:
    image: np.ndarray  # float32, (OUTPUT_SIZE, OUTPUT_SIZE), values in [0, 1]
    metadata: ViewMetadata


# --------------------------------------------------------------------------- header checks


def check_scorable(ds: pydicom.Dataset) -> None:
    """Raise UnsupportedView when the header alone shows the dataset must not be scored.

    Reads only header attributes, never Pixel Data.
    """
    check_sop_class(ds)
    check_frames(ds)
    check_pixel_format(ds)
    view_position(ds)
    laterality(ds)


def sop_class_uid(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        file_meta = getattr(ds, "file_meta", None)
        uid = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    return str(uid or "")


def check_sop_class(ds: pydicom.Dataset) -> None:
    uid = sop_class_uid(ds)
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if uid in FOR_PROCESSING_SOP_CLASSES:
        raise UnsupportedView(
            f"SOP Class UID {uid} ({FOR_PROCESSING_SOP_CLASSES[uid]}) contains raw detector data; "
            "only For Presentation images are scored"
        )
    if intent == "FOR PROCESSING":
        raise UnsupportedView(
            "Presentation Intent Type is FOR PROCESSING; only FOR PRESENTATION images are scored"
        )
    if uid == BREAST_TOMOSYNTHESIS:
        raise UnsupportedView(
            f"SOP Class UID {uid} (Breast Tomosynthesis Image Storage) is a volume; "
            "only 2-D For Presentation mammograms are scored"
        )
    accepted = ", ".join(f"{key} ({name})" for key, name in ACCEPTED_SOP_CLASSES.items())
    if uid not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedView(f"SOP Class UID {uid or '(missing)'} is not a mammogram; accepted: {accepted}")

    modality = str(ds.get("Modality", "") or "").strip().upper()
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if uid in (DIGITAL_XRAY_FOR_PRESENTATION, COMPUTED_RADIOGRAPHY) and modality != "MG" and body_part != "BREAST":
        raise UnsupportedView(
            f"SOP Class UID {uid} with Modality {modality or '(missing)'} and Body Part Examined "
            f"{body_part or '(missing)'} is not a breast image; expected Modality MG or Body Part Examined BREAST"
        )
    if uid in (MAMMOGRAPHY_FOR_PRESENTATION, BREAST_PROJECTION_FOR_PRESENTATION) and modality not in ("MG", ""):
        raise UnsupportedView(f"Modality is {modality}; expected MG")


def check_frames(ds: pydicom.Dataset) -> None:
    frames = ds.get("NumberOfFrames")
    try:
        count = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError) as err:
        raise UnsupportedView(f"Number of Frames is {frames!r}; expected 1") from err
    if count > 1:
        raise UnsupportedView(f"Number of Frames is {count}; only single-frame images are scored")


def check_pixel_format(ds: pydicom.Dataset) -> None:
    samples = ds.get("SamplesPerPixel")
    if samples not in (None, "") and int(samples) != 1:
        raise UnsupportedView(f"Samples per Pixel is {samples}; expected 1 (grayscale)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedView(
            f"Photometric Interpretation is {photometric or '(missing)'}; expected MONOCHROME1 or MONOCHROME2"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows in (None, "") or columns in (None, ""):
        raise UnsupportedView(f"Rows ({rows}) or Columns ({columns}) missing; expected both")
    if int(rows) < MIN_IMAGE_SIZE or int(columns) < MIN_IMAGE_SIZE:
        raise UnsupportedView(
            f"image is {rows} x {columns} pixels (Rows x Columns); at least "
            f"{MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} is needed to score"
        )


def view_position(ds: pydicom.Dataset) -> str:
    """Return "CC" or "MLO" from View Position, else View Code Sequence; raise otherwise."""
    from_code = view_from_code_sequence(ds)
    value = str(ds.get("ViewPosition", "") or "").strip().upper()
    if value:
        if value not in VIEW_POSITIONS:
            raise UnsupportedView(f"View Position is {value}; only CC and MLO are scored")
        if from_code is not None and from_code != value:
            raise UnsupportedView(f"View Position {value} contradicts View Code Sequence ({from_code})")
        return value
    if from_code is None:
        raise UnsupportedView("View Position and View Code Sequence are missing; expected a CC or MLO view")
    return from_code


def view_from_code_sequence(ds: pydicom.Dataset) -> str | None:
    sequence = ds.get("ViewCodeSequence")
    if not sequence:
        return None
    item = sequence[0]
    modifiers = list(item.get("ViewModifierCodeSequence") or []) + list(ds.get("ViewModifierCodeSequence") or [])
    if modifiers:
        names = ", ".join(describe_code(code) for code in modifiers)
        raise UnsupportedView(f"View Modifier Code Sequence contains {names}; only unmodified CC and MLO views are scored")
    key = (str(item.get("CodingSchemeDesignator", "")).strip(), str(item.get("CodeValue", "")).strip())
    view = VIEW_CODES.get(key)
    if view is None:
        raise UnsupportedView(
            f"View Code Sequence contains {describe_code(item)}; only cranio-caudal (SCT 399162004, SRT R-10242) "
            "and medio-lateral oblique (SCT 399368009, SRT R-10226) are scored"
        )
    return view


def describe_code(item: pydicom.Dataset) -> str:
    return (
        f"({item.get('CodeValue', '')}, {item.get('CodingSchemeDesignator', '')}, "
        f"\"{item.get('CodeMeaning', '')}\")"
    )


def laterality(ds: pydicom.Dataset) -> str:
    """Return "L" or "R" from Image Laterality, Laterality or Frame Laterality; raise otherwise.

    Missing, bilateral ("B"), unpaired ("U") or contradictory values are rejected: the
    chest-wall side and the calibration group both depend on laterality.
    """
    sources = {
        "Image Laterality": ds.get("ImageLaterality"),
        "Laterality": ds.get("Laterality"),
        "Frame Laterality": find_attribute(ds, "FrameLaterality", "FrameAnatomySequence"),
    }
    found = {name: str(value).strip().upper() for name, value in sources.items() if value not in (None, "")}
    if not found:
        raise UnsupportedView(
            "Image Laterality, Laterality and Frame Laterality are all missing; expected L or R"
        )
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name} {value}" for name, value in found.items())
        raise UnsupportedView(f"contradictory laterality: {listed}")
    value = next(iter(found.values()))
    if value not in LATERALITIES:
        raise UnsupportedView(f"{next(iter(found))} is {value}; only single breasts (L or R) are scored")
    return value


# --------------------------------------------------------------------------- shared path


def preprocess_array(
    image: np.ndarray,
    padding: np.ndarray | None,
    *,
    laterality: str | None,
    view_position: str | None,
    orientation: breast.Orientation | None,
    size: int = OUTPUT_SIZE,
    warnings: list[str] | None = None,
    voi_source: str = "",
) -> PreprocessedView:
    """Crop, orient and resize a display image in [0, 1]: the step both inputs share.

    ``image`` is float32 with 0 for black; pixels where ``padding`` is True must already
    be 0. ``orientation`` gives the chest-wall edge of ``image``; None detects the side
    from the image content and records a warning.
    """
    if size < 1:
        raise ValueError(f"size is {size}; expected a positive number of pixels")
    warnings = list(warnings or [])
    detection = breast.detect_breast(image, padding)
    if not detection.found:
        warnings.append("no breast found by thresholding; used the whole non-padding area")
    if orientation is None:
        orientation = breast.Orientation(detection.chest_wall_from_content)
        warnings.append(
            f"laterality unknown; chest wall detected on the {orientation.chest_wall} from image content"
        )
    elif orientation.chest_wall in ("left", "right") and orientation.chest_wall != detection.chest_wall_from_content:
        warnings.append(
            f"chest wall placed on the {orientation.chest_wall} as the laterality or Patient Orientation "
            f"gives, but the image content suggests the {detection.chest_wall_from_content}"
        )

    row0, col0, row1, col1 = detection.crop_box
    crop = breast.oriented_view(image[row0:row1, col0:col1], orientation)
    resized = breast.square_resize(crop, size)
    metadata = ViewMetadata(
        laterality=laterality,
        view_position=view_position,
        flipped=orientation.chest_wall == "right",
        crop_box=detection.crop_box,
        source_shape=(int(image.shape[0]), int(image.shape[1])),
        warnings=tuple(warnings),
        chest_wall=orientation.chest_wall,
        flipped_vertical=orientation.flip_vertical,
        voi_source=voi_source,
    )
    return PreprocessedView(resized, metadata)


def orientation_for_laterality(value: str | None) -> breast.Orientation | None:
    """Stored-image convention: left breasts have the chest wall on the left, right on the right."""
    if value is None:
        return None
    return breast.Orientation("left" if value == "L" else "right")


OPPOSITE_DIRECTION = {"A": "P", "P": "A", "L": "R", "R": "L", "H": "F", "F": "H"}


def orientation_from_header(
    ds: pydicom.Dataset, side: str, view: str
) -> tuple[breast.Orientation, list[str]]:
    """Chest-wall edge and vertical flip from Patient Orientation (0020,0020).

    Patient Orientation gives the patient direction of the rows (left to right) and of
    the columns (top to bottom), PS3.3 C.7.6.1.1.1. The chest wall is posterior, so a row
    direction with A puts it on the left and one with P on the right. A column direction
    with A puts it at the top and one with P at the bottom. After turning, rows are mirrored top-bottom
    when "down" points head-wards (H) in an MLO view or laterally in a CC view, so that
    every view ends with the chest wall on the left and feet (MLO) or the medial side
    (CC) downwards, as a left breast stored with A\\FR (MLO) or A\\R (CC).
    Without usable Patient Orientation the laterality convention applies, with a warning.
    """
    value = ds.get("PatientOrientation")
    values = [str(item).strip().upper() for item in value] if value else []
    fallback = orientation_for_laterality(side)
    if len(values) != 2:
        given = "\\".join(values) if values else "missing"
        return fallback, [
            f"Patient Orientation is {given}; assumed the chest wall on the "
            f"{fallback.chest_wall} from Image Laterality {side}"
        ]
    row_direction, column_direction = values

    if "A" in row_direction and "P" not in row_direction:
        chest_wall, down = "left", column_direction
    elif "P" in row_direction and "A" not in row_direction:
        chest_wall, down = "right", column_direction
    elif "A" in column_direction and "P" not in column_direction:
        chest_wall, down = "top", "".join(OPPOSITE_DIRECTION.get(letter, letter) for letter in row_direction)
    elif "P" in column_direction and "A" not in column_direction:
        chest_wall, down = "bottom", row_direction
    else:
        return fallback, [
            f"Patient Orientation {row_direction}\\{column_direction} names no anterior or posterior "
            f"direction; assumed the chest wall on the {fallback.chest_wall} from Image Laterality {side}"
        ]

    medial = "R" if side == "L" else "L"
    lateral = OPPOSITE_DIRECTION[medial]
    if view == "MLO":
        flip_vertical = "H" in down
    else:
        flip_vertical = lateral in down and medial not in down
    warnings = []
    if chest_wall in ("top", "bottom") or flip_vertical:
        warnings.append(
            f"Patient Orientation {row_direction}\\{column_direction} puts the chest wall at the {chest_wall}"
            + (" with rows mirrored" if flip_vertical else "")
            + "; the image was turned to the standard orientation"
        )
    expected = orientation_for_laterality(side).chest_wall
    if chest_wall in ("left", "right") and chest_wall != expected:
        warnings.append(
            f"Patient Orientation {row_direction}\\{column_direction} puts the chest wall of a {side} breast "
            f"on the {chest_wall}; followed Patient Orientation"
        )
    return breast.Orientation(chest_wall, flip_vertical), warnings


# --------------------------------------------------------------------------- entry points


def preprocess_dataset(
    ds: pydicom.Dataset, size: int = OUTPUT_SIZE, timings: dict[str, float] | None = None
) -> PreprocessedView:
    """Check, decode and preprocess one view; raise UnsupportedView or PreprocessingError.

    ``timings``, when given, receives ``decode_ms`` (Pixel Data to stored values) and
    ``preprocess_ms`` (everything after that).
    """
    check_scorable(ds)
    view = view_position(ds)
    side = laterality(ds)

    started = time.perf_counter()
    try:
        stored = decode_stored_values(ds)
        decoded = time.perf_counter()
        pixels = display_from_stored(ds, stored)
    except PixelDataError as err:
        raise PreprocessingError(str(err)) from err
    del stored

    orientation, orientation_warnings = orientation_from_header(ds, side, view)
    result = preprocess_array(
        pixels.image,
        pixels.padding,
        laterality=side,
        view_position=view,
        orientation=orientation,
        size=size,
        warnings=pixels.warnings + orientation_warnings,
        voi_source=pixels.voi_source,
    )
    finished = time.perf_counter()
    for warning in result.metadata.warnings:
        logger.warning("SOP Instance UID %s: %s", ds.get("SOPInstanceUID", "(missing)"), warning)
    if timings is not None:
        timings["decode_ms"] = (decoded - started) * 1000.0
        timings["preprocess_ms"] = (finished - decoded) * 1000.0
    return result


def read_image_file(path: Path) -> np.ndarray:
    """Read a grayscale PGM, PGM.gz or PNG file as float32 in [0, 1] by its bit depth."""
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
        with Image.open(io.BytesIO(raw)) as picture:
            picture.load()
            mode = picture.mode
            pixels = np.asarray(picture)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise PreprocessingError(f"cannot read image file {path}: {err}") from err

    if mode == "L":
        top = 255.0
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow scales PGM files with a maxval other than 65535 to the 16-bit range.
        top = 65535.0
        if pixels.min(initial=0) < 0 or pixels.max(initial=0) > top:
            raise PreprocessingError(f"image file {path} has values outside 0..65535 (mode {mode})")
    else:
        raise PreprocessingError(f"image file {path} has mode {mode}; expected 8- or 16-bit grayscale (L, I;16)")
    return (pixels.astype(np.float32) / np.float32(top)).astype(np.float32)


def preprocess_file(
    path: str | Path,
    laterality: str | None = None,
    view_position: str | None = None,
    size: int = OUTPUT_SIZE,
) -> PreprocessedView:
    """Preprocess a PGM, PGM.gz or PNG film; pixels equal to 0 count as padding.

    ``laterality`` ("L" or "R") places the chest wall by the stored-image convention
    (left breasts on the left); None detects it from the image content with a warning.
    """
    if laterality is not None and laterality not in LATERALITIES:
        raise ValueError(f"laterality is {laterality!r}; expected 'L', 'R' or None")
    if view_position is not None and view_position not in VIEW_POSITIONS:
        raise ValueError(f"view_position is {view_position!r}; expected 'CC', 'MLO' or None")
    path = Path(path)
    image = read_image_file(path)
    if min(image.shape) < MIN_IMAGE_SIZE:
        raise UnsupportedView(
            f"image is {image.shape[0]} x {image.shape[1]} pixels; at least {MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} is needed"
        )
    padding = image == 0.0
    # Training reads many files; their warnings stay in the metadata and go to DEBUG only.
    result = preprocess_array(
        image,
        padding,
        laterality=laterality,
        view_position=view_position,
        orientation=orientation_for_laterality(laterality),
        size=size,
        voi_source="file",
    )
    for warning in result.metadata.warnings:
        logger.debug("%s: %s", path, warning)
    return result

"""DICOM Secondary Capture of a scored view: the view, its reconstruction and the difference.

The Secondary Capture goes into the study of the scored image, in a new series with one
instance per scored view. Its UIDs are derived from the source SOP Instance UID and the
model version, and every attribute is taken from the inputs rather than the clock, so the
same inputs give the same file, byte for byte, as long as the installed versions of this
project, highdicom and Pillow (whose font rendering is burned into the pixels) stay the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pydicom
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from model.checkpoint import code_version
from model.preprocess import PreprocessedView, ViewMetadata
from model.scoring import ViewScore

logger = logging.getLogger(__name__)

MANUFACTURER = "mammo-vae-worker"
# Every Secondary Capture series of this project has this Series Number, so that it sorts
# after the acquired series in a viewer. There is one such series per study, breast and model.
SERIES_NUMBER = 9901
# Instance Number of a map, in the usual hanging order of a screening study, so the numbers
# stay unique within each breast's series; views outside it (or without laterality) come after.
VIEW_INSTANCE_NUMBERS = {("R", "CC"): 1, ("L", "CC"): 2, ("R", "MLO"): 3, ("L", "MLO"): 4}
OTHER_VIEW_INSTANCE_NUMBER = 5
RESEARCH_NOTICE = "NOT FOR DIAGNOSTIC USE - RESEARCH SOFTWARE"
RESEARCH_STATEMENT = (
    "Research software, not a medical device. Not for diagnostic use: "
    "the anomaly score has not been validated for any clinical purpose."
)
# Change this whenever the rendered pixels or the header change for the same inputs. It is
# part of the UID entropy, so a new layout gets new UIDs instead of reusing the old ones.
RENDERING_VERSION = "sc-1"

# Side in pixels of each panel before upscaling; views preprocessed larger (for patch
# scoring) are shown averaged down to this size.
DISPLAY_SIZE = 128
PANEL_SCALE = 3  # nearest-neighbour upscaling of each 128x128 panel
MARGIN = 8  # pixels around and between the panels
LABEL_HEIGHT = 26
TEXT_LINE_HEIGHT = 24
TEXT_FONT_SIZE = 18
# The difference panel shows |view - reconstruction| * DIFFERENCE_GAIN, clipped to [0, 1],
# so white means a difference of 1 / DIFFERENCE_GAIN or more on the [0, 1] intensity scale.
DIFFERENCE_GAIN = 4.0

_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_ROOT_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
# pydicom.uid.generate_uid rejects longer prefixes, which would leave fewer than 10 digits
# of the hash in a 64-character UID.
MAX_UID_ROOT_LENGTH = 54
# Namespace of the name-based (version 5) UUIDs behind the 2.25 UIDs made here.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mammo-vae-worker:secondary-capture")
_OPPOSITE_DIRECTION = str.maketrans("APLRHF", "PARLFH")


def check_uid_root(uid_root: str | None) -> None:
    """Raise ValueError unless ``uid_root`` is None or a UID prefix such as ``"1.2.3."``."""
    if uid_root is None:
        return
    if not isinstance(uid_root, str) or not _UID_ROOT_PATTERN.match(uid_root):
        raise ValueError(
            f"uid_root {uid_root!r} is invalid: expected digits and dots ending with '.', "
            "without leading zeros in a component (for example '1.2.826.0.1.3680043.10.999.')"
        )
    if len(uid_root) > MAX_UID_ROOT_LENGTH:
        raise ValueError(
            f"uid_root {uid_root!r} has {len(uid_root)} characters, but at most {MAX_UID_ROOT_LENGTH} are allowed"
        )


def is_valid_uid(value: object) -> bool:
    """True for a UID of at most 64 characters made of digits and dots, safe as a file name."""
    return isinstance(value, str) and len(value) <= 64 and _UID_PATTERN.match(value) is not None


def derive_uid(uid_root: str | None, *parts: str) -> str:
    """Derive a UID deterministically from ``parts``, under ``uid_root`` or the 2.25 root.

    ``generate_uid(prefix=None)`` ignores its entropy sources and returns a random UUID, so
    the 2.25 form is built here from a name-based UUID (ISO/IEC 9834-8).
    """
    check_uid_root(uid_root)
    # The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
    name = "\x00".join((RENDERING_VERSION, *parts))
    if uid_root is None:
        return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, name).int}"
    return str(generate_uid(prefix=uid_root, entropy_srcs=[name]))


def secondary_capture_uids(
    source_sop_instance_uid: str,
    model_version: str,
    uid_root: str | None,
    *,
    study_instance_uid: str | None = None,
    laterality: str | None = None,
    preprocessing_version: str = "",
) -> tuple[str, str]:
    """Return ``(series_instance_uid, sop_instance_uid)`` of the Secondary Capture of a view.

    With ``study_instance_uid``, the series UID is derived from the study, the laterality
    and the model version. All maps one model makes of one breast then share a series,
    whose series-level Laterality holds for every instance in it. Without it, the series
    UID is derived from the source instance. The SOP Instance UID is derived from the
    source SOP Instance UID, the model and preprocessing versions and RENDERING_VERSION, so
    a rerun of the same model on the same image reuses it.
    """
    if not is_valid_uid(source_sop_instance_uid):
        raise ValueError(f"source SOP Instance UID {source_sop_instance_uid!r} is not a valid UID")
    if study_instance_uid is not None and not is_valid_uid(study_instance_uid):
        raise ValueError(f"Study Instance UID {study_instance_uid!r} is not a valid UID")
    if not model_version:
        raise ValueError("model_version is empty; pass the checkpoint's model_version")
    if study_instance_uid is not None:
        series_uid = derive_uid(uid_root, "study series", study_instance_uid, laterality or "", model_version)
    else:
        series_uid = derive_uid(uid_root, "series", source_sop_instance_uid, model_version)
    sop_uid = derive_uid(uid_root, "instance", source_sop_instance_uid, model_version, preprocessing_version)
    return series_uid, sop_uid


# --- pixels -------------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Map [0, 1] to 0..255, clipping values outside."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale(image: np.ndarray, factor: int = PANEL_SCALE) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def difference_image(score: ViewScore) -> np.ndarray:
    """|view - reconstruction| from the squared error map, times DIFFERENCE_GAIN."""
    return np.sqrt(np.maximum(score.error_map, 0.0)) * DIFFERENCE_GAIN


def score_map_image(score_map: np.ndarray) -> np.ndarray:
    """Scale the score's own map so that its maximum is white; an all-zero map stays black."""
    peak = float(np.max(score_map)) if score_map.size else 0.0
    if peak <= 0.0 or not math.isfinite(peak):
        return np.zeros_like(score_map, dtype=np.float32)
    return np.clip(score_map / peak, 0.0, 1.0).astype(np.float32)


def downscale(image: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """Average a square float image down to ``size`` x ``size`` pixels (PIL box filter)."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (size, size):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float32)


def display_inputs(view: PreprocessedView, score: ViewScore) -> tuple[PreprocessedView, ViewScore]:
    """Average the view, reconstruction and maps down to DISPLAY_SIZE pixels for the panels."""
    if np.shape(view.image) == (DISPLAY_SIZE, DISPLAY_SIZE):
        return view, score
    score_map = None if score.score_map is None else downscale(score.score_map)
    display_score = dataclasses.replace(
        score,
        reconstruction=downscale(score.reconstruction),
        error_map=downscale(score.error_map),
        score_map=score_map,
    )
    return PreprocessedView(downscale(view.image), view.metadata), display_score


def panel_origins(panel_size: int) -> list[tuple[int, int]]:
    """(row, column) of the top-left pixel of each of the three upscaled panels."""
    top = MARGIN + LABEL_HEIGHT
    return [(top, MARGIN + i * (panel_size + MARGIN)) for i in range(3)]


def text_strip_top(panel_size: int) -> int:
    """First row of the text strip below the panels."""
    return MARGIN + LABEL_HEIGHT + panel_size + MARGIN


def render_panels(view: PreprocessedView, score: ViewScore, text_lines: list[str]) -> np.ndarray:
    """Draw the three panels, their labels and ``text_lines`` into one uint8 greyscale image."""
    third = difference_image(score) if score.score_map is None else score_map_image(score.score_map)
    panels = [
        upscale(to_uint8(view.image)),
        upscale(to_uint8(score.reconstruction)),
        upscale(to_uint8(third)),
    ]
    panel_size = panels[0].shape[0]
    width = 3 * panel_size + 4 * MARGIN
    height = text_strip_top(panel_size) + len(text_lines) * TEXT_LINE_HEIGHT + MARGIN

    canvas = np.zeros((height, width), dtype=np.uint8)
    for (row, column), panel in zip(panel_origins(panel_size), panels):
        canvas[row : row + panel_size, column : column + panel_size] = panel

    image = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=TEXT_FONT_SIZE)
    labels = [
        "Preprocessed view",
        "VAE reconstruction",
        (
            f"|view - reconstruction| x{DIFFERENCE_GAIN:g} (white >= {1 / DIFFERENCE_GAIN:g})"
            if score.score_map is None
            else "Score map (white = its maximum)"
        ),
    ]
    for (_, column), label in zip(panel_origins(panel_size), labels):
        draw.text((column, MARGIN), label, fill=255, font=font)
    top = text_strip_top(panel_size)
    for i, line in enumerate(text_lines):
        draw.text((MARGIN, top + i * TEXT_LINE_HEIGHT), line, fill=255, font=font)
    return np.asarray(image, dtype=np.uint8)


# --- text ---------------------------------------------------------------------------------


def format_float(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def threshold_verdict(score: ViewScore, pairwise_score: str | None = None) -> str:
    if pairwise_score is not None and score.anomalous is None:
        return f"{pairwise_score} is judged with the other breast's same view (see the results database)"
    if score.anomalous is None or score.threshold is None:
        return "no threshold (model has no calibration)"
    return "ABOVE THRESHOLD" if score.anomalous else "below threshold"


def describe_view(view: PreprocessedView) -> str:
    metadata = view.metadata
    side = f"{metadata.laterality or '?'} {metadata.view_position or '?'}"
    orientation = "mirrored to put the chest wall on the left" if metadata.flipped else "chest wall on the left"
    return f"{side}, {orientation}"


def summary_lines(
    view: PreprocessedView,
    score: ViewScore,
    model_name: str,
    model_version: str,
    preprocessing_version: str,
    pairwise_score: str | None = None,
) -> list[str]:
    """Text burned into the image below the panels."""
    value_label = "Reconstruction error" if pairwise_score is None else "Per-view score"
    return [
        RESEARCH_NOTICE,
        f"Model {model_name} {model_version}, preprocessing {preprocessing_version}",
        f"View: {describe_view(view)}",
        f"z-score {format_float(score.z_score, '+.2f')}: {threshold_verdict(score, pairwise_score)}",
        (
            f"{value_label} {format_float(score.reconstruction_error, '.4g')}, "
            f"threshold {format_float(score.threshold, '.4g')} "
            f"(calibration group {score.calibration_group or 'n/a'})"
        ),
    ]


def image_comments(
    view: PreprocessedView, score: ViewScore, source_sop_instance_uid: str, pairwise_score: str | None = None
) -> str:
    warnings = "; ".join(view.metadata.warnings) or "none"
    value_label = "reconstruction error" if pairwise_score is None else "per-view score"
    text = (
        f"{RESEARCH_STATEMENT} VAE anomaly score of SOP Instance {source_sop_instance_uid}: "
        f"{value_label} {format_float(score.reconstruction_error, '.6g')}, "
        f"z-score {format_float(score.z_score, '.4f')}, "
        f"threshold {format_float(score.threshold, '.6g')}, {threshold_verdict(score, pairwise_score)}, "
        f"calibration group {score.calibration_group or 'n/a'}. "
        f"View: {describe_view(view)}. Preprocessing warnings: {warnings}."
    )
    # The source's Specific Character Set may be the default repertoire.
    return text.encode("ascii", "replace").decode("ascii")


# --- header -------------------------------------------------------------------------------


def check_text_argument(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not value.isascii() or not value.isprintable() or "\\" in value:
        raise ValueError(f"{name} {value!r} must be printable ASCII without backslashes")


def check_inputs(source: Dataset, view: PreprocessedView, score: ViewScore) -> None:
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = source.get(keyword)
        if not is_valid_uid(str(value) if value is not None else None):
            raise ValueError(f"source dataset has no valid {keyword} (got {value!r})")
    image = np.asarray(view.image)
    if image.ndim != 2:
        raise ValueError(f"view.image must be a 2-D array, got shape {image.shape}")
    arrays = [("score.reconstruction", score.reconstruction), ("score.error_map", score.error_map)]
    if score.score_map is not None:
        arrays.append(("score.score_map", score.score_map))
    for name, array in arrays:
        if np.shape(array) != image.shape:
            raise ValueError(f"{name} has shape {np.shape(array)}; expected {image.shape} like view.image")
    for name, array in [("view.image", image), *arrays]:
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")


def content_date_time(source: Dataset) -> tuple[str | None, str | None]:
    """Content Date and Time of the source image, else its acquisition, series or study ones."""
    for date_keyword, time_keyword in (
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date = source.get(date_keyword)
        if date:
            time = source.get(time_keyword)
            return str(date), str(time) if time else None
    return None, None


def opposite(direction: str) -> str:
    """Reverse a Patient Orientation value letter by letter, such as ``"FR"`` to ``"HL"``."""
    return direction.translate(_OPPOSITE_DIRECTION)


def patient_orientation(source: Dataset, metadata: ViewMetadata) -> list[str]:
    """Patient Orientation of the panels, or empty when the source has none.

    The source's row and column directions go through the steps of
    ``model.breast.oriented_view``: a chest wall at the top or bottom is rotated by 90
    degrees, one on the right is mirrored left-right (``flipped``), and
    ``flipped_vertical`` mirrors top-bottom. Cropping and resizing keep the directions.
    """
    values = source.get("PatientOrientation")
    if not values or len(values) != 2 or not all(str(value).strip() for value in values):
        return []
    rows, columns = (str(value).strip().upper() for value in values)
    if metadata.chest_wall == "top":  # np.rot90(view, 1), counter-clockwise
        rows, columns = columns, opposite(rows)
    elif metadata.chest_wall == "bottom":  # np.rot90(view, -1), clockwise
        rows, columns = opposite(columns), rows
    elif metadata.flipped:
        rows = opposite(rows)
    if metadata.flipped_vertical:
        columns = opposite(columns)
    return [rows, columns]


def acquisition_equipment(source: Dataset) -> list[ContributingEquipment]:
    """Describe the source's acquisition equipment, or return [] when its Manufacturer is missing."""
    try:
        return [ContributingEquipment.for_image_acquisition(source)]
    except (AttributeError, ValueError, KeyError):
        logger.debug("source %s names no acquisition equipment", source.get("SOPInstanceUID"))
        return []


def remove_clock_attributes(sc: Dataset) -> None:
    """Delete what highdicom fills from the clock, so that a rerun writes the same bytes.

    Instance Creation Date/Time, Date/Time of Secondary Capture and the Contribution
    DateTime of highdicom's own Contributing Equipment item are all Type 3.
    """
    for keyword in (
        "InstanceCreationDate",
        "InstanceCreationTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    ):
        if keyword in sc:
            delattr(sc, keyword)
    for item in sc.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == "Highdicom open-source contributors" and "ContributionDateTime" in item:
            del item.ContributionDateTime


def build_secondary_capture(
    source: pydicom.Dataset,
    view: PreprocessedView,
    score: ViewScore,
    *,
    model_version: str,
    model_name: str,
    preprocessing_version: str,
    uid_root: str | None = None,
    pairwise_score: str | None = None,
) -> pydicom.Dataset:
    """Build the Secondary Capture of one scored view, in the source's study.

    The pixels show the view, its reconstruction and the difference (or the score's own
    map, when ``score.score_map`` is set) side by side at DISPLAY_SIZE pixels each, with the
    research notice, model, z-score and verdict burned in below. ``pairwise_score`` names
    a contra_ score, which is judged only when the other breast's view is scored.

    NOTE: a pairwise view's Secondary Capture is written when the view is scored, so it
    shows the per-view score. Its z-score and verdict are in the results database only. Patient and study
    attributes are copied from ``source`` with its Specific Character Set. Content Date and
    Time come from the source (see ``content_date_time``), and attributes that highdicom
    takes from the clock are removed, so the same inputs give a byte-identical file.
    """
    check_inputs(source, view, score)
    view, score = display_inputs(view, score)
    for name, value in (
        ("model_name", model_name),
        ("model_version", model_version),
        ("preprocessing_version", preprocessing_version),
    ):
        check_text_argument(name, value)
    series_description = f"VAE anomaly map {model_name} {model_version}"
    if len(series_description) > 64:
        raise ValueError(
            f"Series Description {series_description!r} exceeds 64 characters; shorten model_name {model_name!r}"
        )

    source_uid = str(source.SOPInstanceUID)
    series_uid, sop_uid = secondary_capture_uids(
        source_uid,
        model_version,
        uid_root,
        study_instance_uid=str(source.StudyInstanceUID),
        laterality=view.metadata.laterality,
        preprocessing_version=preprocessing_version,
    )
    lines = summary_lines(view, score, model_name, model_version, preprocessing_version, pairwise_score)
    pixels = render_panels(view, score, lines)
    content_date, content_time = content_date_time(source)
    orientation = patient_orientation(source, view.metadata)

    # Patient attributes are not passed to SCImage, because its name check warns with the
    # patient name in the message. copy_patient_and_study_information copies them below.
    sc = SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=VIEW_INSTANCE_NUMBERS.get(
            (view.metadata.laterality, view.metadata.view_position), OTHER_VIEW_INSTANCE_NUMBER
        ),
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "F"),  # placeholder, replaced below
        laterality=view.metadata.laterality if view.metadata.laterality in ("L", "R") else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=acquisition_equipment(source),
        series_description=series_description,
        manufacturer_model_name="VAE anomaly map",
        software_versions=[
            f"{MANUFACTURER} {code_version()}",
            f"model {model_version}",
            f"preprocessing {preprocessing_version}",
        ],
        content_date=content_date,
        content_time=content_time,
        specific_character_set=source.get("SpecificCharacterSet"),
    )
    sc.copy_patient_and_study_information(source)
    if content_date is None:
        # Content Date and Time are Type 2C and not required for an image that is not
        # part of a temporally related series, so they are omitted rather than invented.
        for keyword in ("ContentDate", "ContentTime"):
            if keyword in sc:
                delattr(sc, keyword)
    remove_clock_attributes(sc)

    sc.PatientOrientation = orientation
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = "VAE anomaly map"
    sc.SecondaryCaptureDeviceSoftwareVersions = [f"{MANUFACTURER} {code_version()}", f"model {model_version}"]
    sc.DerivationDescription = (
        f"Panels: preprocessed view ({view.image.shape[0]}x{view.image.shape[1]}, {preprocessing_version}), "
        f"its reconstruction by the VAE {model_name} {model_version}, and "
        f"|view - reconstruction| x{DIFFERENCE_GAIN:g}. {RESEARCH_STATEMENT}"
    )
    sc.ImageComments = image_comments(view, score, source_uid, pairwise_score)

    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source_uid
    sc.SourceImageSequence = [reference]

    logger.debug("built Secondary Capture %s of %s", sop_uid, source_uid)
    return sc


# --- file ---------------------------------------------------------------------------------


def secondary_capture_path(sc: pydicom.Dataset, exports_dir: Path) -> Path:
    """``exports_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, after checking both UIDs."""
    parts = []
    for keyword in ("StudyInstanceUID", "SOPInstanceUID"):
        value = sc.get(keyword)
        text = str(value) if value is not None else None
        if not is_valid_uid(text):
            raise ValueError(f"{keyword} {value!r} is not a valid UID, so it cannot name a file")
        parts.append(text)
    return Path(exports_dir) / parts[0] / f"{parts[1]}.dcm"


def write_secondary_capture(sc: pydicom.Dataset, exports_dir: Path) -> Path:
    """Write ``sc`` as a DICOM file atomically (temporary file, fsync, rename) and return its path."""
    path = secondary_capture_path(sc, exports_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            sc.save_as(stream, enforce_file_format=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    logger.debug("wrote Secondary Capture %s", path)
    return path

"""A seeded corpus of mammography DICOM variants, each with the outcome the worker must give.

Every object is a derived test object: a real GE Senographe DS header (tests/dicom_factory.py)
with the pixels of a real mini-MIAS film, downscaled to 256 x 256 (the full-field size cases
excepted). The seed chooses the film, among the normal left films, and the sampling phase of
the downscale. Each variant sits beside its plain twin: MONOCHROME2, 12 bits stored, Explicit VR
Little Endian, For Presentation, left MLO, SIGMOID window (the GE header's VOI LUT Function).

A case states its expected outcome. A ``scored`` case has an array equal to a reference
within a tolerance: the twin's array, or a display image computed here from the formulas of
DICOM PS3.3 C.11. An ``unsupported`` or ``failed`` case has a substring of the stored
reason, and a ``refused`` case the DIMSE status of the C-STORE response.

Write the corpus as files, with a manifest and a storescu configuration that proposes each
file's own transfer syntax::

    python tests/corpus.py OUTDIR [--seed N] [--full-field]
    storescu -nh -xf OUTDIR/storescu.cfg Corpus -aec MAMMOVAE 127.0.0.1 11112 OUTDIR/*.dcm
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import struct
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_factory  # noqa: E402

from model import breast  # noqa: E402
from model.preprocess import (  # noqa: E402
    PreprocessedView,
    PreprocessingError,
    UnsupportedView,
    check_scorable,
    preprocess_array,
    preprocess_dataset,
)

SEED = 0
DOWNSCALE = 4
# Films whose chest-wall side the content test gets wrong (docs/preprocessing.md) are left out,
# so that no case carries a warning its twin lacks because of the film chosen.
EXCLUDED_FILMS = frozenset({148, 151, 152, 257, 258, 259, 260, 320})

MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MAMMOGRAPHY_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DIGITAL_XRAY_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
BREAST_PROJECTION_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
BREAST_PROJECTION_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.13.1.5"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Largest absolute difference between arrays that are equal up to float32 rounding.
EXACT = 1e-5
# Bit-depth twins: dicom_factory rounds Window Center and Width to integers at each depth,
# which moves the sigmoid by up to half a stored value (largest at 10 bits).
BIT_DEPTH_TOLERANCE = 2e-3
# Lossy syntaxes change stored values, padding pixels included. A padding pixel whose value
# moved off Pixel Padding Value counts as image (up to a quarter of the padding pixels
# after JPEG-LS NEAR 2), which lowers the breast threshold and moves the crop box. Over the
# films of seeds 0 to 9 at 256 x 256, the crop edges moved by up to 6 pixels and the mean
# absolute difference of the 128 x 128 output reached 0.024. Lossy cases are therefore
# bounded by these two values with a margin, not by the maximum difference.
LOSSY_MEAN_DIFFERENCE = 0.03
LOSSY_CROP_SHIFT = 8
# JPEG-LS near-lossless NEAR parameter: no stored value moves by more than this.
JPEG_LS_NEAR = 2
# Stored-value error bounds of the other lossy encodings. Largest errors seen over seeds 0
# to 9: JPEG Extended 18 (of 4095), JPEG 2000 at a ratio of 10 78 (of 4095), JPEG
# Baseline 20 (of 255).
JPEG_EXTENDED_MAX_ERROR = 32
JPEG2000_MAX_ERROR = 128
JPEG_BASELINE_MAX_ERROR = 32

FULL_FIELD_SHAPE = (5625, 4096)  # Rows x Columns of the full-field views, 23 million pixels


@dataclass(frozen=True)
class Expectation:
    """The outcome a case must have, in preprocessing and after C-STORE to the worker."""

    status: str  # "scored", "unsupported", "failed" or "refused"
    # Substring of the stored reason (unsupported, failed) or of the refusal (refused).
    reason: str | None = None
    # Substring of one warning stored with the result.
    warning: str | None = None
    # Reference of a scored case: "twin" (the array of ``Case.twin``) or "formula" (the
    # display image ``Case.display`` through the shared crop and resize step).
    reference: str | None = None
    max_difference: float | None = None  # largest absolute difference from the reference
    mean_difference: float | None = None  # used with lossy syntaxes instead of the maximum
    crop_shift: int = 0  # largest change of a crop-box edge, in source pixels
    max_stored_error: int | None = None  # lossy syntaxes: bound on the decoded stored values
    # C-STORE response status; None when no presentation context is accepted.
    dimse_status: int | None = 0x0000
    # What storescu gets for this file, where it differs from the C-STORE of the bytes as
    # they are: "no presentation context" or "unreadable".
    storescu_refusal: str | None = None
    # The preprocessing function's outcome where it differs from the worker's: a header
    # mismatch that the SCP refuses still reaches preprocess_dataset when read from a file.
    preprocess_status: str | None = None
    preprocess_reason: str | None = None

    @property
    def stored(self) -> bool:
        return self.status in ("scored", "unsupported", "failed")


@dataclass
class Case:
    """One corpus object: its encoded file, what it varies and what must come of it."""

    name: str
    group: str
    description: str
    expected: Expectation
    file_bytes: bytes  # the file as written and sent; a Part 10 file unless ``has_file_meta`` is False
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    has_file_meta: bool = True
    twin: str | None = None  # name of the reference case of a "twin" expectation
    # Expected display image (float64, 0 black, 1 white) and padding mask of a "formula" case.
    display: np.ndarray | None = None
    padding: np.ndarray | None = None
    laterality: str | None = None
    view_position: str | None = None
    # Stored values of the source of a lossy case, to check the codec's error.
    source_stored: np.ndarray | None = field(default=None, repr=False)

    def dataset(self, stop_before_pixels: bool = False) -> Dataset:
        """Read the case's file as the worker would (``force`` for a file without file meta)."""
        return pydicom.dcmread(io.BytesIO(self.file_bytes), force=not self.has_file_meta, stop_before_pixels=stop_before_pixels)

    def manifest_entry(self, file_name: str) -> dict:
        expected = self.expected
        return {
            "name": self.name,
            "file": file_name,
            "group": self.group,
            "description": self.description,
            "status": expected.status,
            "reason": expected.reason,
            "warning": expected.warning,
            "dimse_status": None if expected.dimse_status is None else f"0x{expected.dimse_status:04X}",
            "storescu_refusal": expected.storescu_refusal,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "transfer_syntax_uid": self.transfer_syntax_uid,
        }


# --------------------------------------------------------------------------- formulas
# Display values computed from DICOM PS3.3 C.11 independently of model/dicom_pixels.py.


def sigmoid_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply VOI LUT Function SIGMOID with output range [0, 1] (PS3.3 C.11.2.1.2)."""
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply VOI LUT Function LINEAR with output range [0, 1] (PS3.3 C.11.2.1.2)."""
    y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    y = np.where(x <= center - 0.5 - (width - 1.0) / 2.0, 0.0, y)
    return np.where(x > center - 0.5 + (width - 1.0) / 2.0, 1.0, y)


def linear_exact_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply VOI LUT Function LINEAR_EXACT with output range [0, 1] (PS3.3 C.11.2.1.2)."""
    y = (x - center) / width + 0.5
    y = np.where(x <= center - width / 2.0, 0.0, y)
    return np.where(x > center + width / 2.0, 1.0, y)


def lut_lookup(x: np.ndarray, lut: np.ndarray, first_mapped: int, bits: int) -> np.ndarray:
    """Map through a VOI LUT Sequence item (PS3.3 C.11.2): clamp to the table, scale 2**bits - 1 to 1."""
    index = np.clip(x.astype(np.int64) - first_mapped, 0, len(lut) - 1)
    return lut[index] / float((1 << bits) - 1)


def percentile_fallback(x: np.ndarray, padding: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Stretch two percentiles of the non-padding pixels to [0, 1], the documented fallback without VOI."""
    low, high = np.percentile(x[~padding], percentiles)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


# --------------------------------------------------------------------------- films


def normal_left_films() -> list[int]:
    """Numbers of the normal (NORM) left (even) films listed in mini-MIAS Info.txt."""
    films = set()
    for line in (dicom_factory.data_dir() / "mini-mias" / "Info.txt").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith("mdb") and fields[2] == "NORM":
            number = int(fields[0][3:])
            if number % 2 == 0 and number not in EXCLUDED_FILMS:
                films.add(number)
    return sorted(films)


def choose_film(seed: int) -> tuple[int, np.ndarray]:
    """The seed's film and its 256 x 256 uint8 pixels (every DOWNSCALE-th pixel from a seeded phase)."""
    rng = np.random.default_rng(seed)
    films = normal_left_films()
    number = int(films[int(rng.integers(len(films)))])
    row_phase, column_phase = (int(value) for value in rng.integers(0, DOWNSCALE, size=2))
    pixels = dicom_factory.load_mias(number)[row_phase::DOWNSCALE, column_phase::DOWNSCALE]
    return number, np.ascontiguousarray(pixels)


# --------------------------------------------------------------------------- encoding


def part10_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dataset_bytes(ds: Dataset, little_endian: bool = True, implicit_vr: bool = False) -> bytes:
    """The dataset's elements alone, without preamble or file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = little_endian
    buffer.is_implicit_VR = implicit_vr
    write_dataset(buffer, ds)
    return buffer.getvalue()


def raw_part10(meta: FileMetaDataset, body: bytes) -> bytes:
    """A Part 10 file with ``body`` as given, for datasets pydicom would not write."""
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    buffer.write(body)
    return buffer.getvalue()


def convert_with_dcmtk(ds: Dataset, tool: str, *options: str) -> bytes:
    """Run a DCMTK converter (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle) on ``ds``; return the output file."""
    import worker_support  # imported here: it loads the worker and torch

    with tempfile.TemporaryDirectory(prefix="corpus-") as folder:
        source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        source.write_bytes(part10_bytes(ds))
        result = subprocess.run(
            [worker_support.dcmtk(tool), *options, str(source), str(target)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(options)} failed with status {result.returncode}: {result.stderr}")
        return target.read_bytes()


def unambiguous_vrs(ds: Dataset) -> Dataset:
    """Resolve "US or SS" elements of the GE headers by Pixel Representation, as a writer must."""
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    for element in ds.iterall():
        if element.VR == "US or SS":
            element.VR = "SS" if signed else "US"
    return ds


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def first_window(ds: Dataset) -> tuple[float, float]:
    center, width = ds.WindowCenter, ds.WindowWidth
    if isinstance(center, pydicom.multival.MultiValue):
        center, width = center[0], width[0]
    return float(center), float(width)


# --------------------------------------------------------------------------- the corpus


class CorpusBuilder:
    """Builds the cases of one seed; ``build()`` returns them by name, in a stable order."""

    def __init__(self, seed: int = SEED) -> None:
        self.seed = seed
        self.film_number, self.film = choose_film(seed)
        self.cases: dict[str, Case] = {}

    # ----------------------------------------------------------------------- helpers

    def mammogram(self, name: str, pixels8: np.ndarray | None = None, *, bits_stored: int = 12, **options) -> Dataset:
        """Build a left MLO view of the seed's film with study and instance UIDs derived from ``name``."""
        pixels8 = self.film if pixels8 is None else pixels8
        laterality = options.pop("laterality", "L")
        view = options.pop("view_position", "MLO")
        ds = dicom_factory.make_mammogram(
            dicom_factory.to_bits(pixels8, bits_stored),
            laterality,
            view,
            study_key=f"corpus-{self.seed}-{name}",
            instance_key=name,
            bits_stored=bits_stored,
            **options,
        )
        ds.PatientID = f"CORPUS{self.seed:04d}"
        return unambiguous_vrs(ds)

    def add(
        self,
        name: str,
        group: str,
        description: str,
        expected: Expectation,
        ds: Dataset | None = None,
        *,
        file_bytes: bytes | None = None,
        header: Dataset | None = None,
        has_file_meta: bool = True,
        twin: str | None = None,
        display: np.ndarray | None = None,
        padding: np.ndarray | None = None,
        source_stored: np.ndarray | None = None,
        view_position: str | None = None,
    ) -> Case:
        """Record case ``name``: ``ds`` encoded as a Part 10 file, or ``file_bytes`` as given.

        ``header`` replaces reading the file back, for a file that pydicom cannot read.
        """
        if name in self.cases:
            raise ValueError(f"case {name!r} is defined twice")
        if file_bytes is None:
            if ds is None:
                raise ValueError(f"case {name!r} needs a dataset or file bytes")
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            file_bytes = part10_bytes(ds)
        if header is None:
            header = pydicom.dcmread(io.BytesIO(file_bytes), stop_before_pixels=True, force=not has_file_meta)
        meta = getattr(header, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is None:
            syntax = ImplicitVRLittleEndian if header.original_encoding[0] else ExplicitVRLittleEndian
        # The class a peer proposes: the file meta's, which may differ from the dataset's.
        sop_class_uid = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        case = Case(
            name=name,
            group=group,
            description=description,
            expected=expected,
            file_bytes=file_bytes,
            sop_class_uid=str(sop_class_uid or header.SOPClassUID),
            sop_instance_uid=str(header.SOPInstanceUID),
            study_instance_uid=str(header.StudyInstanceUID),
            transfer_syntax_uid=str(syntax),
            has_file_meta=has_file_meta,
            twin=twin,
            display=display,
            padding=padding,
            laterality=str(header.get("ImageLaterality") or "L"),
            view_position=view_position or str(header.get("ViewPosition") or "MLO"),
            source_stored=source_stored,
        )
        self.cases[name] = case
        return case

    def stored(self, ds: Dataset) -> np.ndarray:
        """Return the stored values of an uncompressed dataset as float64."""
        dtype = "<i2" if int(ds.PixelRepresentation) == 1 else "<u2"
        return np.frombuffer(ds.PixelData, dtype=dtype).reshape(int(ds.Rows), int(ds.Columns)).astype(np.float64)

    def twin_expected(self, max_difference: float = EXACT, warning: str | None = None) -> Expectation:
        return Expectation("scored", reference="twin", max_difference=max_difference, warning=warning)

    # ----------------------------------------------------------------------- groups

    def build(self) -> dict[str, Case]:
        self.build_polarity()
        self.build_voi()
        self.build_intent()
        self.build_depth()
        self.build_laterality()
        self.build_view()
        self.build_transfer_syntaxes()
        self.build_other_objects()
        self.build_broken()
        return self.cases

    def build_polarity(self) -> None:
        plain = self.mammogram("plain")
        # The GE For Presentation header carries Presentation LUT Shape IDENTITY, the
        # value that goes with MONOCHROME2.
        self.add("plain", "polarity", "the plain twin: MONOCHROME2, 12 bits, SIGMOID window", Expectation("scored"), plain)
        center, _ = first_window(plain)

        def monochrome1(name: str, shape: str | None) -> Dataset:
            ds = dicom_factory.make_mammogram(
                4095 - dicom_factory.to_bits(self.film, 12),
                "L",
                "MLO",
                study_key=f"corpus-{self.seed}-{name}",
                instance_key=name,
                photometric="MONOCHROME1",
            )
            ds.PatientID = f"CORPUS{self.seed:04d}"
            ds.WindowCenter = [4095 - center]
            ds.WindowWidth = plain.WindowWidth
            if shape is None:
                del ds.PresentationLUTShape
            else:
                ds.PresentationLUTShape = shape
            return unambiguous_vrs(ds)

        self.add(
            "monochrome1",
            "polarity",
            "MONOCHROME1 (stored values and window centre mirrored), no Presentation LUT Shape",
            self.twin_expected(),
            monochrome1("monochrome1", None),
            twin="plain",
        )
        self.add(
            "monochrome1-inverse",
            "polarity",
            "MONOCHROME1 with Presentation LUT Shape INVERSE, the pair the MG IOD requires",
            self.twin_expected(),
            monochrome1("monochrome1-inverse", "INVERSE"),
            twin="plain",
        )
        self.add(
            "monochrome1-identity",
            "polarity",
            "MONOCHROME1 with the contradicting Presentation LUT Shape IDENTITY",
            self.twin_expected(warning="IDENTITY contradicts MONOCHROME1"),
            monochrome1("monochrome1-identity", "IDENTITY"),
            twin="plain",
        )
        ds = self.mammogram("monochrome2-inverse")
        ds.PresentationLUTShape = "INVERSE"
        self.add(
            "monochrome2-inverse",
            "polarity",
            "MONOCHROME2 with the contradicting Presentation LUT Shape INVERSE: scored as MONOCHROME2",
            self.twin_expected(warning="INVERSE contradicts MONOCHROME2"),
            ds,
            twin="plain",
        )

    def build_voi(self) -> None:
        plain = self.cases["plain"].dataset()
        stored = self.stored(plain)
        padding = stored == 0
        tissue = stored[~padding]
        low, high = float(tissue.min()), float(tissue.max())

        def windowed(name: str, function: str | None, centers: list[float], widths: list[float]) -> Dataset:
            ds = self.mammogram(name)
            ds.WindowCenter = centers
            ds.WindowWidth = widths
            ds.WindowCenterWidthExplanation = [f"WINDOW {index + 1}" for index in range(len(centers))]
            if function is None:
                del ds.VOILUTFunction
            else:
                ds.VOILUTFunction = function
            return ds

        center = round(low + 0.45 * (high - low))
        width = round(0.6 * (high - low))
        cases = [
            ("voi-sigmoid", "SIGMOID", sigmoid_window, "VOI LUT Function SIGMOID with its own window"),
            ("voi-linear", "LINEAR", linear_window, "VOI LUT Function LINEAR"),
            ("voi-linear-exact", "LINEAR_EXACT", linear_exact_window, "VOI LUT Function LINEAR_EXACT"),
            ("voi-default-linear", None, linear_window, "no VOI LUT Function: LINEAR is the default"),
        ]
        for name, function, formula, description in cases:
            display = np.where(padding, 0.0, formula(stored, center, width))
            self.add(
                name,
                "voi",
                f"{description} (centre {center}, width {width})",
                Expectation("scored", reference="formula", max_difference=EXACT),
                windowed(name, function, [center], [width]),
                display=display,
                padding=padding,
            )

        centers = [center, round(low + 0.8 * (high - low)), round(low + 0.2 * (high - low))]
        widths = [width, round(0.2 * (high - low)), round(0.3 * (high - low))]
        self.add(
            "voi-several-windows",
            "voi",
            f"three Window Center/Width pairs {centers} / {widths} with SIGMOID: the first is used",
            Expectation("scored", reference="formula", max_difference=EXACT),
            windowed("voi-several-windows", "SIGMOID", centers, widths),
            display=np.where(padding, 0.0, sigmoid_window(stored, centers[0], widths[0])),
            padding=padding,
        )

        ds = self.mammogram("voi-no-window")
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"):
            delattr(ds, keyword)
        self.add(
            "voi-no-window",
            "voi",
            "no VOI LUT Sequence and no Window Center/Width: the 0.5th and 99.5th percentiles of the non-padding pixels map to 0 and 1",
            Expectation("scored", reference="formula", max_difference=EXACT, warning="no VOI LUT Sequence or Window Center/Width"),
            ds,
            display=np.where(padding, 0.0, percentile_fallback(stored, padding, (0.5, 99.5))),
            padding=padding,
        )

        first_mapped = int(low)
        entries = int(high - low) + 1
        ramp = np.linspace(0.0, 1.0, entries)
        for bits, as_words in ((8, False), (16, True)):
            name = f"voi-lut-{bits}-bit"
            top = (1 << bits) - 1
            lut = np.round(ramp**0.6 * top).astype(np.int64)
            item = Dataset()
            item.LUTDescriptor = [entries % 65536, first_mapped, bits]
            if as_words:
                item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
            else:
                item.add_new("LUTData", "US", [int(value) for value in lut])
            item.LUTExplanation = f"test gamma 0.6, {bits}-bit entries"
            ds = self.mammogram(name)  # keeps the header's SIGMOID window, which the sequence overrides
            ds.VOILUTSequence = Sequence([item])
            self.add(
                name,
                "voi",
                f"VOI LUT Sequence with {entries} {bits}-bit entries ({'OW' if as_words else 'US'} LUT Data) beside a SIGMOID window: the sequence is used",
                Expectation("scored", reference="formula", max_difference=EXACT),
                ds,
                display=np.where(padding, 0.0, lut_lookup(stored, lut, first_mapped, bits)),
                padding=padding,
            )

    def build_intent(self) -> None:
        ds = self.mammogram("for-processing-mg", header=dicom_factory.GE_FOR_PROCESSING)
        self.add(
            "for-processing-mg",
            "intent",
            "Digital Mammography X-Ray For Processing (real GE For Processing header, MONOCHROME1)",
            Expectation("unsupported", reason=f"SOP Class UID {MAMMOGRAPHY_FOR_PROCESSING} (Digital Mammography X-Ray Image Storage - For Processing)"),
            ds,
        )
        ds = self.mammogram("for-processing-dx")
        ds.SOPClassUID = DIGITAL_XRAY_FOR_PROCESSING
        ds.PresentationIntentType = "FOR PROCESSING"
        self.add(
            "for-processing-dx",
            "intent",
            "Digital X-Ray For Processing of a breast",
            Expectation("unsupported", reason=f"SOP Class UID {DIGITAL_XRAY_FOR_PROCESSING} (Digital X-Ray Image Storage - For Processing)"),
            ds,
        )
        ds = self.mammogram("for-processing-breast-projection")
        ds.SOPClassUID = BREAST_PROJECTION_FOR_PROCESSING
        ds.PresentationIntentType = "FOR PROCESSING"
        self.add(
            "for-processing-breast-projection",
            "intent",
            "Breast Projection X-Ray For Processing",
            Expectation(
                "unsupported",
                reason=f"SOP Class UID {BREAST_PROJECTION_FOR_PROCESSING} (Breast Projection X-Ray Image Storage - For Processing)",
            ),
            ds,
        )
        ds = self.mammogram("for-processing-intent")
        ds.PresentationIntentType = "FOR PROCESSING"
        self.add(
            "for-processing-intent",
            "intent",
            "For Presentation SOP class with Presentation Intent Type FOR PROCESSING",
            Expectation("unsupported", reason="Presentation Intent Type is FOR PROCESSING"),
            ds,
        )

    def build_depth(self) -> None:
        for bits in (10, 14, 16):
            self.add(
                f"bits-{bits}",
                "depth",
                f"Bits Stored {bits} (the film scaled to the full {bits}-bit range, window scaled with it)",
                self.twin_expected(BIT_DEPTH_TOLERANCE),
                self.mammogram(f"bits-{bits}", bits_stored=bits),
                twin="plain",
            )

        plain = self.cases["plain"].dataset()
        center, width = first_window(plain)
        stored = dicom_factory.to_bits(self.film, 12).astype(np.int16) - 2048

        ds = self.mammogram("signed")
        ds.PixelRepresentation = 1
        ds.PixelData = stored.astype("<i2").tobytes()
        del ds.PixelPaddingValue
        ds.add_new("PixelPaddingValue", "SS", -2048)
        ds.WindowCenter = [center - 2048]
        self.add("signed", "depth", "signed pixels (12-bit values less 2048), window centre shifted", self.twin_expected(), unambiguous_vrs(ds), twin="plain")

        ds = self.mammogram("signed-intercept")
        ds.PixelRepresentation = 1
        ds.PixelData = stored.astype("<i2").tobytes()
        del ds.PixelPaddingValue
        ds.add_new("PixelPaddingValue", "SS", -2048)
        ds.RescaleIntercept = 2048
        self.add(
            "signed-intercept",
            "depth",
            "signed pixels (12-bit values less 2048) with Rescale Intercept 2048",
            self.twin_expected(),
            unambiguous_vrs(ds),
            twin="plain",
        )

        ds = self.mammogram("rescale")
        ds.RescaleSlope = 2
        ds.RescaleIntercept = -1000
        ds.WindowCenter = [2 * center - 1000]
        ds.WindowWidth = [2 * width]
        self.add("rescale", "depth", "Rescale Slope 2 and Rescale Intercept -1000, window in the rescaled units", self.twin_expected(), ds, twin="plain")

    def build_laterality(self) -> None:
        ds = self.mammogram("laterality-right", np.ascontiguousarray(self.film[:, ::-1]), laterality="R")
        self.add(
            "laterality-right",
            "laterality",
            "the film mirrored and stored as a right breast (Patient Orientation P\\L)",
            self.twin_expected(),
            ds,
            twin="plain",
        )
        ds = self.mammogram("laterality-series")
        del ds.ImageLaterality
        ds.Laterality = "L"
        self.add("laterality-series", "laterality", "no Image Laterality; series Laterality L", self.twin_expected(), ds, twin="plain")

        ds = self.mammogram("laterality-frame")
        del ds.ImageLaterality
        anatomy = Dataset()
        anatomy.FrameLaterality = "L"
        group = Dataset()
        group.FrameAnatomySequence = Sequence([anatomy])
        ds.SharedFunctionalGroupsSequence = Sequence([group])
        self.add(
            "laterality-frame",
            "laterality",
            "no Image Laterality or Laterality; Frame Laterality L in the Shared Functional Groups",
            self.twin_expected(),
            ds,
            twin="plain",
        )
        ds = self.mammogram("laterality-missing")
        del ds.ImageLaterality
        self.add(
            "laterality-missing",
            "laterality",
            "no Image Laterality, Laterality or Frame Laterality",
            Expectation("unsupported", reason="Image Laterality, Laterality and Frame Laterality are all missing"),
            ds,
        )
        ds = self.mammogram("laterality-contradictory")
        ds.Laterality = "R"
        self.add(
            "laterality-contradictory",
            "laterality",
            "Image Laterality L and series Laterality R",
            Expectation("unsupported", reason="contradictory laterality: Image Laterality L, Laterality R"),
            ds,
        )
        ds = self.mammogram("laterality-bilateral")
        ds.ImageLaterality = "B"
        self.add(
            "laterality-bilateral",
            "laterality",
            "Image Laterality B (both breasts in one image)",
            Expectation("unsupported", reason="Image Laterality is B; only single breasts (L or R) are scored"),
            ds,
        )

    def build_view(self) -> None:
        self.add("view-cc", "view", "View Position CC", self.twin_expected(), self.mammogram("view-cc", view_position="CC"), twin="plain")
        codes = [
            ("view-code-cc-sct", "399162004", "SCT", "cranio-caudal", "CC"),
            ("view-code-cc-srt", "R-10242", "SRT", "cranio-caudal", "CC"),
            ("view-code-mlo-sct", "399368009", "SCT", "medio-lateral oblique", "MLO"),
            ("view-code-mlo-srt", "R-10226", "SRT", "medio-lateral oblique", "MLO"),
        ]
        for name, value, scheme, meaning, view in codes:
            ds = self.mammogram(name, view_position=view)
            del ds.ViewPosition
            ds.ViewCodeSequence = Sequence([code_item(value, scheme, meaning)])
            description = f"no View Position; View Code Sequence ({value}, {scheme}, \"{meaning}\")"
            self.add(name, "view", description, self.twin_expected(), ds, twin="plain", view_position=view)

        for value in ("ML", "LM", "XCCL"):
            name = f"view-{value.lower()}"
            ds = self.mammogram(name)
            ds.ViewPosition = value
            self.add(name, "view", f"View Position {value}", Expectation("unsupported", reason=f"View Position is {value}; only CC and MLO are scored"), ds)

        ds = self.mammogram("view-code-ml")
        del ds.ViewPosition
        ds.ViewCodeSequence = Sequence([code_item("399260004", "SCT", "medio-lateral")])
        self.add(
            "view-code-ml",
            "view",
            "no View Position; View Code Sequence medio-lateral (SCT 399260004)",
            Expectation("unsupported", reason="View Code Sequence contains (399260004, SCT"),
            ds,
        )
        # View modifiers from DICOM CID 4015, with the SNOMED CT and the older SNOMED RT codes.
        modifiers = [
            ("view-spot", "MLO", ("399368009", "SCT", "medio-lateral oblique"), ("399055006", "SCT", "Spot Compression")),
            ("view-magnification", "CC", ("R-10242", "SRT", "cranio-caudal"), ("R-102D6", "SRT", "Magnification")),
        ]
        for name, view, view_code, modifier in modifiers:
            ds = self.mammogram(name, view_position=view)
            item = code_item(*view_code)
            item.ViewModifierCodeSequence = Sequence([code_item(*modifier)])
            ds.ViewCodeSequence = Sequence([item])
            self.add(
                name,
                "view",
                f"View Position {view} with View Modifier Code Sequence ({modifier[0]}, {modifier[1]}, \"{modifier[2]}\")",
                Expectation("unsupported", reason=f'View Modifier Code Sequence contains ({modifier[0]}, {modifier[1]}, "{modifier[2]}")'),
                ds,
            )

    def build_transfer_syntaxes(self) -> None:
        plain = self.cases["plain"].dataset()
        plain_stored = self.stored(plain)

        def converted(name: str, tool: str, *options: str, source: Dataset | None = None) -> bytes:
            ds = copy.deepcopy(source if source is not None else self.mammogram(name))
            ds.StudyInstanceUID = dicom_factory.derived_uid("study", f"corpus-{self.seed}-{name}")
            ds.SOPInstanceUID = dicom_factory.derived_uid("instance", f"corpus-{self.seed}-{name}", name)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            # +un keeps the SOP Instance UID that DCMTK would replace after lossy compression.
            return convert_with_dcmtk(ds, tool, *options, *(("+un",) if tool in ("dcmcjpeg", "dcmcjpls") else ()))

        def compressed(name: str, syntax: str, source: Dataset | None = None, **options) -> Dataset:
            ds = source if source is not None else self.mammogram(name)
            ds.compress(syntax, generate_instance_uid=False, **options)
            return ds

        lossless = [
            ("syntax-implicit-little", "Implicit VR Little Endian (dcmconv +ti)", lambda n: converted(n, "dcmconv", "+ti")),
            ("syntax-explicit-big", "Explicit VR Big Endian (dcmconv +tb)", lambda n: converted(n, "dcmconv", "+tb")),
            ("syntax-deflated", "Deflated Explicit VR Little Endian (dcmconv +td)", lambda n: converted(n, "dcmconv", "+td")),
            ("syntax-jpeg-lossless", "JPEG Lossless, Process 14 (dcmcjpeg +el)", lambda n: converted(n, "dcmcjpeg", "+el")),
            ("syntax-jpeg-lossless-sv1", "JPEG Lossless, Process 14 Selection Value 1 (dcmcjpeg +e1)", lambda n: converted(n, "dcmcjpeg", "+e1")),
            ("syntax-jpeg-ls-lossless", "JPEG-LS Lossless (dcmcjpls +el)", lambda n: converted(n, "dcmcjpls", "+el")),
            ("syntax-jpeg2000-lossless", "JPEG 2000 Lossless Only (pydicom with OpenJPEG)", lambda n: part10_bytes(compressed(n, JPEG2000Lossless))),
            ("syntax-rle", "RLE Lossless (dcmcrle)", lambda n: converted(n, "dcmcrle")),
        ]
        for name, description, encode in lossless:
            self.add(name, "syntax", description, self.twin_expected(0.0), file_bytes=encode(name), twin="plain")

        bits16 = self.mammogram("syntax-jpeg2000-lossless-16-bit", bits_stored=16)
        self.add(
            "syntax-jpeg2000-lossless-16-bit",
            "syntax",
            "JPEG 2000 Lossless Only of the Bits Stored 16 variant",
            Expectation("scored", reference="twin", max_difference=0.0),
            compressed("syntax-jpeg2000-lossless-16-bit", JPEG2000Lossless, source=bits16),
            twin="bits-16",
        )

        def lossy(max_stored_error: int) -> Expectation:
            return Expectation(
                "scored",
                reference="twin",
                mean_difference=LOSSY_MEAN_DIFFERENCE,
                crop_shift=LOSSY_CROP_SHIFT,
                max_stored_error=max_stored_error,
            )

        self.add(
            "syntax-jpeg-ls-near-lossless",
            "syntax",
            f"JPEG-LS near-lossless, NEAR {JPEG_LS_NEAR} (dcmcjpls +en +md {JPEG_LS_NEAR})",
            lossy(JPEG_LS_NEAR),
            file_bytes=converted("syntax-jpeg-ls-near-lossless", "dcmcjpls", "+en", "+md", str(JPEG_LS_NEAR)),
            twin="plain",
            source_stored=plain_stored,
        )
        # dcmcjpeg's lossy modes stretch min..max to the full range unless +sr keeps the stored range.
        self.add(
            "syntax-jpeg-extended",
            "syntax",
            "JPEG Extended, 12 bits, quality 90 (dcmcjpeg +ee +sr)",
            lossy(JPEG_EXTENDED_MAX_ERROR),
            file_bytes=converted("syntax-jpeg-extended", "dcmcjpeg", "+ee", "+sr"),
            twin="plain",
            source_stored=plain_stored,
        )
        self.add(
            "syntax-jpeg2000",
            "syntax",
            "JPEG 2000 lossy at a compression ratio of 10 (pydicom with OpenJPEG)",
            lossy(JPEG2000_MAX_ERROR),
            compressed("syntax-jpeg2000", JPEG2000, j2k_cr=[10]),
            twin="plain",
            source_stored=plain_stored,
        )

        eight = self.eight_bit("plain-8-bit")
        self.add("plain-8-bit", "syntax", "the 8-bit twin: Bits Allocated and Bits Stored 8, for JPEG Baseline", Expectation("scored"), eight)
        eight_stored = np.frombuffer(eight.PixelData, dtype=np.uint8).reshape(eight.Rows, eight.Columns).astype(np.float64)
        self.add(
            "syntax-jpeg-baseline",
            "syntax",
            "JPEG Baseline, 8 bits, quality 90 (dcmcjpeg +eb +sr)",
            lossy(JPEG_BASELINE_MAX_ERROR),
            file_bytes=converted("syntax-jpeg-baseline", "dcmcjpeg", "+eb", "+sr", source=self.eight_bit("syntax-jpeg-baseline")),
            twin="plain-8-bit",
            source_stored=eight_stored,
        )

    def eight_bit(self, name: str) -> Dataset:
        ds = self.mammogram(name, bits_stored=8)
        ds.BitsAllocated = 8
        ds.PixelData = self.film.astype(np.uint8).tobytes()
        return ds

    def build_other_objects(self) -> None:
        ds = self.mammogram("dx-breast")
        ds.SOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
        ds.Modality = "DX"
        ds.BodyPartExamined = "BREAST"
        self.add("dx-breast", "other", "Digital X-Ray For Presentation, Modality DX, Body Part Examined BREAST", self.twin_expected(), ds, twin="plain")

        ds = self.mammogram("cr-chest")
        ds.SOPClassUID = COMPUTED_RADIOGRAPHY
        ds.Modality = "CR"
        ds.BodyPartExamined = "CHEST"
        self.add(
            "cr-chest",
            "other",
            "Computed Radiography, Modality CR, Body Part Examined CHEST",
            Expectation("unsupported", reason="is not a breast image"),
            ds,
        )

        ds = self.mammogram("breast-projection")
        ds.SOPClassUID = BREAST_PROJECTION_FOR_PRESENTATION
        self.add(
            "breast-projection",
            "other",
            "Breast Projection X-Ray For Presentation (single frame), which preprocessing scores",
            self.twin_expected(),
            ds,
            twin="plain",
        )

        ds = self.mammogram("ct-image")
        ds.SOPClassUID = CT_IMAGE
        ds.Modality = "CT"
        self.add(
            "ct-image",
            "other",
            "CT Image Storage, a class the worker does not accept",
            Expectation("refused", reason="no presentation context", dimse_status=None, preprocess_status="unsupported", preprocess_reason="is not a mammogram"),
            ds,
        )

        self.add("tomosynthesis", "other", "Breast Tomosynthesis, 20 frames, uncompressed", self.tomosynthesis_expected(), self.tomosynthesis("tomosynthesis", 20))
        ds = self.tomosynthesis("tomosynthesis-undecodable", 20)
        # Each frame becomes a fragment of bytes that no RLE decoder accepts, so decoding
        # would make the instance "failed": "unsupported" shows nothing decoded it.
        undecodable = b"\xff\x00" * 64
        ds.PixelData = encapsulate([undecodable] * 20)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = RLELossless
        self.add(
            "tomosynthesis-undecodable",
            "other",
            "Breast Tomosynthesis, 20 frames of RLE Lossless fragments that no decoder accepts",
            self.tomosynthesis_expected(),
            ds,
        )

    def tomosynthesis_expected(self) -> Expectation:
        return Expectation("unsupported", reason=f"SOP Class UID {BREAST_TOMOSYNTHESIS} (Breast Tomosynthesis Image Storage) is a volume")

    def tomosynthesis(self, name: str, frames: int, shape: tuple[int, int] | None = None) -> Dataset:
        """A Breast Tomosynthesis object: ``frames`` slices of the film, shifted one column each."""
        pixels8 = self.film if shape is None else np.asarray(Image.fromarray(self.film).resize(shape[::-1], Image.Resampling.BILINEAR))
        ds = self.mammogram(name, pixels8)
        ds.SOPClassUID = BREAST_TOMOSYNTHESIS
        ds.NumberOfFrames = frames
        stored = dicom_factory.to_bits(pixels8, 12)
        volume = np.stack([np.roll(stored, index, axis=1) for index in range(frames)])
        ds.PixelData = volume.astype("<u2").tobytes()
        anatomy = Dataset()
        anatomy.FrameLaterality = "L"
        group = Dataset()
        group.FrameAnatomySequence = Sequence([anatomy])
        ds.SharedFunctionalGroupsSequence = Sequence([group])
        return ds

    def build_broken(self) -> None:
        ds = self.mammogram("broken-truncated")
        ds.PixelData = ds.PixelData[:-1000]
        expected_bytes = 256 * 256 * 2
        self.add(
            "broken-truncated",
            "broken",
            "Pixel Data 1000 bytes shorter than Rows x Columns x 2",
            Expectation("failed", reason=f"truncated pixel data: Pixel Data contains {expected_bytes - 1000} bytes"),
            ds,
        )
        ds = self.mammogram("broken-missing-pixel-data")
        del ds.PixelData
        self.add("broken-missing-pixel-data", "broken", "no Pixel Data element", Expectation("failed", reason="missing Pixel Data (7FE0,0010)"), ds)

        ds = self.mammogram("broken-rows-too-many")
        ds.Rows = int(ds.Rows) + 44
        self.add(
            "broken-rows-too-many",
            "broken",
            "Rows 44 larger than the Pixel Data holds",
            Expectation("failed", reason=f"truncated pixel data: Pixel Data contains {expected_bytes} bytes but Rows {int(ds.Rows)} x Columns"),
            ds,
        )
        ds = self.mammogram("broken-columns-too-few")
        ds.Columns = int(ds.Columns) - 56
        self.add(
            "broken-columns-too-few",
            "broken",
            "Columns 56 smaller than the Pixel Data holds",
            Expectation("failed", reason="Rows/Columns disagree with the Pixel Data length"),
            ds,
        )

        ds = self.mammogram("broken-jpeg2000")
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        codestream = next(generate_fragments(ds.PixelData))
        ds.PixelData = encapsulate([codestream[: len(codestream) // 2 & ~1]])
        self.add(
            "broken-jpeg2000",
            "broken",
            "JPEG 2000 Lossless codestream cut after half its bytes",
            Expectation("failed", reason="failed to decode Pixel Data (JPEG 2000 Image Compression (Lossless Only))"),
            ds,
        )

        ds = self.mammogram("no-file-meta")
        ds.preamble = None
        self.add(
            "no-file-meta",
            "broken",
            "a dataset file without preamble and file meta (Explicit VR Little Endian)",
            self.twin_expected(),
            file_bytes=dataset_bytes(ds),
            has_file_meta=False,
            twin="plain",
        )

        names = [
            ("name-latin1", "ISO_IR 100", "Müller^Jörg"),
            ("name-utf8", "ISO_IR 192", "Ødegård^Åsa=山田^花子"),
        ]
        for name, charset, patient_name in names:
            ds = self.mammogram(name)
            ds.SpecificCharacterSet = charset
            ds.PatientName = patient_name
            self.add(name, "broken", f"Patient's Name {patient_name!r} in {charset}", self.twin_expected(), ds, twin="plain")
        ds = self.mammogram("name-invalid-utf8")
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "PLACEHOLDER"
        ds["PatientName"].value = b"Inv\xe9lide^Nom\xff"  # ISO 8859-1 bytes, invalid as UTF-8
        self.add(
            "name-invalid-utf8",
            "broken",
            "Patient's Name with bytes that are invalid UTF-8 under ISO_IR 192",
            self.twin_expected(),
            ds,
            twin="plain",
        )

        ds = self.mammogram("refused-sop-class-mismatch")
        meta = copy.deepcopy(ds.file_meta)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = CT_IMAGE
        self.add(
            "refused-sop-class-mismatch",
            "broken",
            "sent as Digital Mammography For Presentation, but the dataset's SOP Class UID is CT Image Storage",
            Expectation(
                "refused",
                reason="does not match the Affected SOP Class UID",
                dimse_status=0xA900,
                storescu_refusal="no presentation context",
                preprocess_status="unsupported",
                preprocess_reason="is not a mammogram",
            ),
            file_bytes=raw_part10(meta, dataset_bytes(ds)),
        )

        ds = self.mammogram("refused-unparseable")
        meta = copy.deepcopy(ds.file_meta)
        body = dataset_bytes(ds)
        position = body.find(struct.pack("<HH", 0x0010, 0x0010))
        # A Referenced Image Sequence whose declared length runs far past the end of the data.
        broken = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\0\0" + struct.pack("<I", 0x7FFFFFF0)
        self.add(
            "refused-unparseable",
            "broken",
            "a sequence whose declared length runs past the end of the dataset",
            Expectation(
                "refused",
                reason="dataset could not be parsed",
                dimse_status=0xC210,
                storescu_refusal="unreadable",
                # Read whole from a file, the sequence swallows the rest of the dataset.
                preprocess_status="unsupported",
                preprocess_reason="Photometric Interpretation is (missing)",
            ),
            file_bytes=raw_part10(meta, body[:position] + broken + body[position:]),
            header=ds,
        )

        # pydicom warns about the deliberately invalid UIDs below when it sets and writes them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Invalid value for VR UI", category=UserWarning)
            self.build_invalid_uids()

    def build_invalid_uids(self) -> None:
        ds = self.mammogram("refused-invalid-study-uid")
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.{self.seed}.Study"
        self.add(
            "refused-invalid-study-uid",
            "broken",
            "Study Instance UID with letters, which a UID may not contain",
            Expectation(
                "refused",
                reason=f"StudyInstanceUID '{ds.StudyInstanceUID}' is not a valid UID",
                dimse_status=0xC210,
                preprocess_status="scored",
            ),
            ds,
        )
        ds = self.mammogram("refused-invalid-sop-instance-uid")
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.{self.seed}.Instance"
        self.add(
            "refused-invalid-sop-instance-uid",
            "broken",
            "SOP Instance UID with letters, which a UID may not contain",
            Expectation(
                "refused",
                reason=f"Affected SOP Instance UID '{ds.SOPInstanceUID}' is not a valid UID",
                dimse_status=0xC211,
                preprocess_status="scored",
            ),
            ds,
        )

    def build_full_field(self) -> None:
        """Four full-field 16-bit views of one study (the film resized to 4096 x 5625)."""
        rows, columns = FULL_FIELD_SHAPE
        resized = np.asarray(Image.fromarray(dicom_factory.load_mias(self.film_number)).resize((columns, rows), Image.Resampling.BILINEAR))
        study_key = f"corpus-{self.seed}-full-field"
        for laterality in ("L", "R"):
            pixels8 = resized if laterality == "L" else np.ascontiguousarray(resized[:, ::-1])
            for view in ("CC", "MLO"):
                name = f"full-field-{laterality}{view}".lower()
                ds = dicom_factory.make_mammogram(
                    dicom_factory.to_bits(pixels8, 16), laterality, view, study_key=study_key, instance_key=name, bits_stored=16
                )
                ds.PatientID = f"CORPUS{self.seed:04d}"
                self.add(
                    name,
                    "size",
                    f"{laterality} {view}, {columns} x {rows} pixels, Bits Stored 16 ({round(rows * columns * 2 / 2**20)} MiB of Pixel Data)",
                    Expectation("scored"),
                    unambiguous_vrs(ds),
                )


@functools.cache
def build_corpus(seed: int = SEED) -> dict[str, Case]:
    """Every case of ``seed`` but the full-field ones, by name; cached, so tests share one build."""
    return CorpusBuilder(seed).build()


def full_field_cases(seed: int = SEED) -> dict[str, Case]:
    """The four full-field views of ``seed`` (176 MiB of files), built anew on each call."""
    builder = CorpusBuilder(seed)
    builder.build_full_field()
    return builder.cases


# --------------------------------------------------------------------------- outcomes


def run_preprocessing(case: Case) -> tuple[str, str | None, PreprocessedView | None]:
    """Read and preprocess a case as the worker's pipeline does; return (status, reason, view)."""
    try:
        ds = case.dataset()
    except Exception as err:  # noqa: BLE001 - the pipeline records any read failure as failed
        return "failed", f"could not be read: {type(err).__name__}: {err}", None
    try:
        check_scorable(ds)
        view = preprocess_dataset(ds)
    except UnsupportedView as err:
        return "unsupported", str(err), None
    except PreprocessingError as err:
        return "failed", str(err), None
    return "scored", None, view


def reference_view(case: Case, cases: dict[str, Case]) -> PreprocessedView:
    """The array a scored case must match: its twin's, or its formula display image cropped and resized."""
    if case.expected.reference == "twin":
        status, reason, view = run_preprocessing(cases[case.twin])
        if view is None:
            raise AssertionError(f"twin {case.twin} of {case.name} was {status}: {reason}")
        return view
    if case.expected.reference == "formula":
        return preprocess_array(
            case.display.astype(np.float32),
            case.padding,
            laterality=case.laterality,
            view_position=case.view_position,
            orientation=breast.Orientation("left" if case.laterality == "L" else "right"),
        )
    raise ValueError(f"case {case.name} has no reference (reference is {case.expected.reference!r})")


def mirrored_box(view: PreprocessedView) -> tuple[int, int, int, int]:
    """Crop box of a view as it lies in the left-right mirrored image."""
    row0, col0, row1, col1 = view.metadata.crop_box
    width = view.metadata.source_shape[1]
    return (row0, width - col1, row1, width - col0)


# --------------------------------------------------------------------------- files


STORESCU_PROFILE = "Corpus"


def storescu_config(cases: list[Case]) -> str:
    """A storescu configuration (``-xf FILE Corpus``) that proposes each file's own transfer syntax.

    storescu otherwise proposes uncompressed syntaxes only and converts compressed files,
    which it cannot do for most of the corpus.
    """
    syntaxes = sorted({case.transfer_syntax_uid for case in cases})
    classes = sorted({str(case.dataset(stop_before_pixels=True).SOPClassUID) for case in cases if case.expected.storescu_refusal != "unreadable"})
    lines = ["[[TransferSyntaxes]]"]
    for index, syntax in enumerate(syntaxes, start=1):
        lines += [f"[Syntax{index}]", f"TransferSyntax1 = {syntax}"]
    lines += ["", "[[PresentationContexts]]", f"[{STORESCU_PROFILE}]"]
    number = 0
    for sop_class in classes:
        for index, _ in enumerate(syntaxes, start=1):
            number += 1
            lines.append(f"PresentationContext{number} = {sop_class}\\Syntax{index}")
    if number > 128:
        raise ValueError(f"{number} presentation contexts needed; an association allows at most 128")
    lines += ["", "[[Profiles]]", f"[{STORESCU_PROFILE}]", f"PresentationContexts = {STORESCU_PROFILE}", ""]
    return "\n".join(lines)


def write_corpus(folder: Path, cases: dict[str, Case]) -> list[Path]:
    """Write each case as ``NN-name.dcm``, plus ``manifest.json`` and ``storescu.cfg``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, manifest = [], []
    for index, case in enumerate(cases.values(), start=1):
        path = folder / f"{index:02d}-{case.name}.dcm"
        path.write_bytes(case.file_bytes)
        paths.append(path)
        manifest.append(case.manifest_entry(path.name))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "storescu.cfg").write_text(storescu_config(list(cases.values())))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/corpus.py",
        description="Write the DICOM test corpus (derived test objects, not patient data) with its manifest.",
    )
    parser.add_argument("folder", type=Path, help="output folder for NN-name.dcm, manifest.json and storescu.cfg")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed that chooses the film and sampling phase (default {SEED})")
    parser.add_argument("--full-field", action="store_true", help="add four 4096 x 5625 16-bit views (44 MiB each)")
    args = parser.parse_args(argv)

    cases = dict(build_corpus(args.seed))
    if args.full_field:
        cases.update(full_field_cases(args.seed))
    paths = write_corpus(args.folder, cases)
    print(f"Wrote {len(paths)} files to {args.folder} (mini-MIAS film mdb{CorpusBuilder(args.seed).film_number:03d}).")
    print("Send them with the file's own transfer syntax:")
    print(f"  storescu -nh -xf {args.folder / 'storescu.cfg'} {STORESCU_PROFILE} -aec MAMMOVAE 127.0.0.1 11112 {args.folder}/*.dcm")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build test mammography objects from real GE Senographe headers and mini-MIAS pixels.

Every object made here is a derived test object: its header comes from a real GE
Senographe DS file, its pixels from a real mini-MIAS film, and its UIDs are new ones
derived deterministically from the arguments, so the same call gives the same object.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

GE_FOR_PRESENTATION = "MG-Im-GE_Seno_1_ForPresentation.dcm"
GE_FOR_PROCESSING = "MG-Im-GE_Seno_1_ForProcessing.dcm"
GE_UTF8_NAME = "MG-Im-GE-SenDS-scaled.dcm"


def data_dir() -> Path:
    """The shared data folder named by ``MAMMO_DATA_DIR`` (default ``../shared/data``)."""
    root = Path(os.environ.get("MAMMO_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    return root.resolve()


def mias_path(number: int) -> Path:
    return data_dir() / "mini-mias" / "images" / f"mdb{number:03d}.pgm.gz"


def load_mias(number: int) -> np.ndarray:
    """Return film ``mdbNNN`` as a uint8 1024x1024 array (row 0 at the top)."""
    with gzip.open(mias_path(number), "rb") as stream:
        return np.asarray(Image.open(io.BytesIO(stream.read())), dtype=np.uint8)


def mias_laterality(number: int) -> str:
    """Even film numbers are left breasts, odd numbers right (MIAS README note 1)."""
    return "L" if number % 2 == 0 else "R"


def to_bits(pixels8: np.ndarray, bits_stored: int) -> np.ndarray:
    """Scale 8-bit film values to the full range of ``bits_stored`` bits, as uint16."""
    top = (1 << bits_stored) - 1
    return np.round(pixels8.astype(np.float64) * (top / 255.0)).astype(np.uint16)


def load_header(name: str = GE_FOR_PRESENTATION) -> Dataset:
    return pydicom.dcmread(data_dir() / "dicom-mg" / name)


def derived_uid(*parts: object) -> str:
    """A deterministic UID under the 2.25 root, derived from ``parts``.

    pydicom 3.0 ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy
    sources and returns a random UUID, so the name-based UUID is built here.
    """
    name = "\x1f".join(["mammo-vae-worker tests", *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def make_mammogram(
    pixels: np.ndarray,
    laterality: str,
    view_position: str,
    *,
    study_key: str = "study-1",
    instance_key: str | None = None,
    header: str = GE_FOR_PRESENTATION,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    keep_voi_lut_sequence: bool = False,
) -> Dataset:
    """Put ``pixels`` (uint16, already at ``bits_stored`` bits) into a real GE header.

    Windows are reset to cover the pixels' own range, so the header's VOI LUT Function
    (SIGMOID for GE) applies to the new data. The header's VOI LUT Sequence was made
    for the original detector values and is removed unless ``keep_voi_lut_sequence``.
    """
    ds = copy.deepcopy(load_header(header))
    instance_key = instance_key or f"{laterality}{view_position}"
    rows, columns = pixels.shape

    ds.StudyInstanceUID = derived_uid("study", study_key)
    ds.SeriesInstanceUID = derived_uid("series", study_key, laterality, view_position)
    ds.SOPInstanceUID = derived_uid("instance", study_key, instance_key)
    ds.FrameOfReferenceUID = derived_uid("frame", study_key)
    ds.ImageLaterality = laterality
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["A", "R"] if laterality == "L" else ["P", "L"]
    ds.DerivationDescription = "Test object: mini-MIAS film pixels in a GE Senographe DS header"
    for keyword in ("IconImageSequence", "SourceImageSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    if "ViewCodeSequence" in ds:
        del ds.ViewCodeSequence
    if not keep_voi_lut_sequence and "VOILUTSequence" in ds:
        del ds.VOILUTSequence

    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = photometric
    ds.PixelPaddingValue = 0 if photometric == "MONOCHROME2" else (1 << bits_stored) - 1
    # The header's VR is "US or SS"; with unsigned pixels it is US, and writers need one VR.
    ds["PixelPaddingValue"].VR = "US"
    ds.PixelSpacing = [0.2, 0.2]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.NumberOfFrames = 1

    tissue = pixels[pixels != ds.PixelPaddingValue]
    low, high = (float(tissue.min()), float(tissue.max())) if tissue.size else (0.0, float(pixels.max()))
    ds.WindowCenter = [round((low + high) / 2)]
    ds.WindowWidth = [max(round(high - low), 2)]
    ds.WindowCenterWidthExplanation = ["NORMAL"]
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return ds


def make_study(
    films: dict[tuple[str, str], int],
    study_key: str,
    bits_stored: int = 12,
    downscale: int = 1,
) -> list[Dataset]:
    """Four (or fewer) views of one study; ``films`` maps (laterality, view) to a MIAS number.

    ``downscale`` keeps every n-th pixel, to make small objects for fast tests.
    """
    datasets = []
    for (laterality, view_position), number in films.items():
        pixels8 = load_mias(number)[::downscale, ::downscale]
        datasets.append(
            make_mammogram(
                to_bits(pixels8, bits_stored),
                laterality,
                view_position,
                study_key=study_key,
                bits_stored=bits_stored,
            )
        )
    return datasets


# Films of two mini-MIAS women whose films are both normal (mdb003/004 and mdb007/008).
# mini-MIAS has MLO films only, so the "CC" views of test studies are MLO films too.
DEFAULT_FOUR_VIEWS = {("R", "CC"): 7, ("L", "CC"): 8, ("R", "MLO"): 3, ("L", "MLO"): 4}


def write_study(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

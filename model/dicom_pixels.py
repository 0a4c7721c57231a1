"""Turn the Pixel Data of a mammogram into display values in [0, 1].

The steps follow the grayscale pipeline of DICOM PS3.3 C.11: decode, Modality LUT,
VOI LUT, then polarity (MONOCHROME1 is inverted once). The result is float32 with 0 for
black and 1 for white as a MONOCHROME2 display would show it, plus a mask of the pixels
marked as padding by Pixel Padding Value (0028,0120) and Pixel Padding Range Limit
(0028,0121).
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

logger = logging.getLogger(__name__)


class PixelDataError(ValueError):
    """The Pixel Data cannot be decoded or disagrees with the header."""


# Percentiles of the non-padding pixels that map to 0 and 1 when the dataset has no
# VOI LUT Sequence and no Window Center/Width.
FALLBACK_PERCENTILES = (0.5, 99.5)
# The fallback percentiles are taken on a strided sample of about this many pixels.
FALLBACK_SAMPLE_PIXELS = 1_000_000
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Pixels mapped per step by lookup(), which bounds its temporary index arrays.
LOOKUP_PIXELS = 1 << 16


@dataclass
class DisplayPixels:
    """Pixel values after Modality LUT, VOI LUT and polarity, in [0, 1]."""

    image: np.ndarray  # float32, (Rows, Columns)
    padding: np.ndarray | None  # bool, True where the stored value is padding
    voi_source: str  # "VOI LUT Sequence", "window", or "fallback"
    warnings: list[str] = field(default_factory=list)


def find_attribute(ds: Dataset, keyword: str, group_keyword: str | None = None):
    """Return ``keyword`` from the top level, else from the functional groups.

    Enhanced objects (Breast Projection X-Ray) keep rescale, window and laterality in
    Shared or Per-Frame Functional Groups. ``group_keyword`` names the macro sequence
    that contains ``keyword`` there, for example ``"FrameVOILUTSequence"``.
    """
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    if group_keyword is None:
        return None
    for sequence_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(sequence_keyword)
        if not groups:
            continue
        macro = groups[0].get(group_keyword)
        if macro:
            value = macro[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def expected_pixel_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    total_bits = int(ds.Rows) * int(ds.Columns) * samples * frames * bits
    return (total_bits + 7) // 8


def decode_stored_values(ds: Dataset) -> np.ndarray:
    """Return the stored values of the single frame as a 2-D integer array.

    Inside ``reduced_decoding()`` a large image may come back at a reduced resolution
    instead (see there). Raises PixelDataError naming the fault: missing Pixel Data, a
    length that disagrees with Rows, Columns and Bits Allocated, or a decoder failure.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError("float Pixel Data is not supported; expected integer Pixel Data (7FE0,0010)")
        raise PixelDataError("missing Pixel Data (7FE0,0010)")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise PixelDataError(f"missing {keyword}, which is needed to decode Pixel Data")

    transfer_syntax = dataset_transfer_syntax(ds)
    if not transfer_syntax.is_compressed:
        check_native_length(ds)

    request = _REDUCED_DECODING.get()
    if request is not None:
        reduced = decode_reduced(ds, transfer_syntax, request)
        if reduced is not None:
            return reduced

    try:
        # The decoder, unlike Dataset.pixel_array, keeps no copy on the dataset.
        stored, _ = get_decoder(transfer_syntax).as_array(ds, index=0)
    except Exception as err:  # pydicom and its plugins raise many exception types
        raise PixelDataError(f"failed to decode Pixel Data ({transfer_syntax.name}): {err}") from err

    expected_shape = (int(ds.Rows), int(ds.Columns))
    if stored.shape != expected_shape:
        raise PixelDataError(
            f"decoded Pixel Data has shape {stored.shape} but Rows x Columns is "
            f"{expected_shape[0]} x {expected_shape[1]}"
        )
    return stored


def dataset_transfer_syntax(ds: Dataset) -> pydicom.uid.UID:
    """Return the Transfer Syntax UID of the file meta, else the native syntax ``ds`` was read in.

    A dataset read with ``force=True`` from a file without file meta records its VR and
    byte order in ``original_encoding``, and uncompressed Pixel Data needs nothing more.
    Encapsulated Pixel Data without a transfer syntax names no codec, so it is rejected.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return pydicom.uid.UID(syntax)
    if ds["PixelData"].is_undefined_length:
        raise PixelDataError(
            "missing Transfer Syntax UID (0002,0010) for encapsulated Pixel Data, so its codec is unknown; "
            "read the dataset from a file whose file meta names the transfer syntax"
        )
    implicit_vr, little_endian = ds.original_encoding
    if little_endian is False:
        return pydicom.uid.ExplicitVRBigEndian
    # NOTE: a dataset built in memory has no original encoding; its native Pixel Data is
    # taken to be little endian, as pydicom writes it.
    return pydicom.uid.ImplicitVRLittleEndian if implicit_vr else pydicom.uid.ExplicitVRLittleEndian


def check_native_length(ds: Dataset) -> None:
    expected = expected_pixel_bytes(ds)
    actual = len(ds.PixelData)
    geometry = f"Rows {ds.Rows} x Columns {ds.Columns} x Bits Allocated {ds.BitsAllocated}"
    if actual < expected:
        raise PixelDataError(
            f"truncated pixel data: Pixel Data contains {actual} bytes but {geometry} needs "
            f"{expected} bytes"
        )
    # One trailing byte pads odd lengths to an even length (PS3.5 8.1.1).
    if actual > expected + 1:
        raise PixelDataError(
            f"Rows/Columns disagree with the Pixel Data length: {geometry} needs {expected} "
            f"bytes but Pixel Data contains {actual}"
        )


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Mark stored values equal to Pixel Padding Value, or inside the padding range."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    low = to_signed(int(value), signed)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == low
    high = to_signed(int(limit), signed)
    low, high = min(low, high), max(low, high)
    return (stored >= low) & (stored <= high)


def to_signed(value: int, signed: bool) -> int:
    """Read a US-encoded 16-bit padding value as signed when pixels are signed."""
    if signed and value >= 1 << 15:
        return value - (1 << 16)
    return value


def apply_modality_lut(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Return float32 modality values (Modality LUT Sequence, else Rescale Slope/Intercept)."""
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        item = sequence[0]
        lut = lut_data(item, ds)
        entries, first_mapped = lut_geometry(item)
        return lookup(stored, lut, first_mapped, entries)

    slope = find_attribute(ds, "RescaleSlope", "PixelValueTransformationSequence")
    intercept = find_attribute(ds, "RescaleIntercept", "PixelValueTransformationSequence")
    values = stored.astype(np.float32)
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def lut_geometry(item: Dataset) -> tuple[int, int]:
    descriptor = item.get("LUTDescriptor")
    if not descriptor or len(descriptor) != 3:
        raise PixelDataError(f"invalid LUT Descriptor {descriptor!r}; expected three values")
    entries = int(descriptor[0]) or 1 << 16
    first_mapped = int(descriptor[1])
    # The first mapped value is US or SS depending on the pixel representation.
    if first_mapped >= 1 << 15 and first_mapped + entries > 1 << 16:
        first_mapped -= 1 << 16
    return entries, first_mapped


def lut_bits(item: Dataset) -> int:
    bits = int(item.LUTDescriptor[2])
    if bits not in range(8, 17):
        raise PixelDataError(f"LUT Descriptor gives {bits} bits per entry; expected 8 to 16")
    return bits


def lut_data(item: Dataset, ds: Dataset) -> np.ndarray:
    """Return LUT Data as an integer array, whether stored as US values or OW bytes."""
    if "LUTData" not in item:
        raise PixelDataError("missing LUT Data (0028,3006) in a LUT item")
    entries, _ = lut_geometry(item)
    element = item["LUTData"]
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        little = getattr(ds, "is_little_endian", None)
        if little is None:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            little = True if syntax is None else syntax.is_little_endian
        if len(value) == entries:  # 8-bit entries packed one per byte
            data = np.frombuffer(value, dtype=np.uint8)
        else:
            data = np.frombuffer(value[: 2 * entries], dtype="<u2" if little else ">u2")
    else:
        data = np.asarray(value if isinstance(value, (list, tuple)) else [value], dtype=np.int64)
    if data.size != entries:
        raise PixelDataError(f"LUT Data contains {data.size} entries but LUT Descriptor declares {entries}")
    return data.astype(np.int64)


def lookup(
    values: np.ndarray, lut: np.ndarray, first_mapped: int, entries: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Map ``values`` through a LUT into float32 ``out`` (may be ``values`` itself).

    Values are rounded to the nearest integer. Those below the first mapped value take
    the first entry, and those past the last entry take the last. The integer indices
    exist for about LOOKUP_PIXELS pixels at a time, so no full-size int64 array is made.
    """
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    table = lut.astype(np.float32)
    rows = max(1, LOOKUP_PIXELS // max(1, values.shape[1]))
    for start in range(0, values.shape[0], rows):
        block = values[start : start + rows]
        if block.dtype.kind == "f":
            block = np.rint(block)
        index = block.astype(np.int64)
        index -= first_mapped
        np.clip(index, 0, entries - 1, out=index)
        out[start : start + rows] = table[index]
    return out


def window_parameters(ds: Dataset) -> tuple[float, float, str] | None:
    """Return the first Window Center/Width pair and the VOI LUT Function, if any."""
    center = find_attribute(ds, "WindowCenter", "FrameVOILUTSequence")
    width = find_attribute(ds, "WindowWidth", "FrameVOILUTSequence")
    if center in (None, "") or width in (None, ""):
        return None
    center = first_value(center)
    width = first_value(width)
    function = find_attribute(ds, "VOILUTFunction", "FrameVOILUTSequence") or "LINEAR"
    return float(center), float(width), str(function).strip().upper()


def first_value(value):
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0]
    return value


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Apply Window Center/Width in place with output range [0, 1] (PS3.3 C.11.2.1.2).

    LINEAR:       y = ((x - (c - 0.5)) / (w - 1) + 0.5), 0 at or below c - 0.5 - (w - 1) / 2,
                  1 above c - 0.5 + (w - 1) / 2.
    LINEAR_EXACT: y = (x - c) / w + 0.5, 0 at or below c - w / 2, 1 above c + w / 2.
    SIGMOID:      y = 1 / (1 + exp(-4 (x - c) / w)).

    Both linear formulas reach 0 and 1 exactly at their bounds, so clipping the formula
    to [0, 1] gives the piecewise definition without full-size masks.
    """
    if function == "LINEAR":
        if width < 1:
            raise PixelDataError(f"Window Width {width} is invalid for LINEAR; expected at least 1")
        if width == 1:
            # The formula degenerates to a threshold at c - 0.5.
            np.greater(values, np.float32(center - 0.5), out=values, casting="unsafe")
            return values
        values -= np.float32(center - 0.5)
        values /= np.float32(width - 1)
        values += np.float32(0.5)
        np.clip(values, 0.0, 1.0, out=values)
        return values
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PixelDataError(f"Window Width {width} is invalid for LINEAR_EXACT; expected more than 0")
        values -= np.float32(center)
        values /= np.float32(width)
        values += np.float32(0.5)
        np.clip(values, 0.0, 1.0, out=values)
        return values
    if function == "SIGMOID":
        if width <= 0:
            raise PixelDataError(f"Window Width {width} is invalid for SIGMOID; expected more than 0")
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.clip(values, -80.0, 80.0, out=values)  # keeps exp() finite in float32
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    raise PixelDataError(f"VOI LUT Function {function!r} is not supported; expected one of {', '.join(VOI_LUT_FUNCTIONS)}")


def apply_voi_lut_item(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray:
    """Map through a VOI LUT Sequence item; output scaled by 2**bits - 1 to [0, 1]."""
    lut = lut_data(item, ds)
    entries, first_mapped = lut_geometry(item)
    bits = lut_bits(item)
    top = float((1 << bits) - 1)
    if lut.max(initial=0) > top:
        # Some writers declare fewer bits than the data use; scale by the data instead.
        top = float(lut.max())
    return lookup(values, lut / top, first_mapped, entries, out=values)


def apply_fallback_window(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """Stretch the FALLBACK_PERCENTILES of the non-padding pixels linearly to [0, 1]."""
    step = max(1, int(np.sqrt(values.size / FALLBACK_SAMPLE_PIXELS)))
    sample = values[::step, ::step]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
    if sample.size == 0:
        values[...] = 0.0
        return values
    low, high = np.percentile(sample, FALLBACK_PERCENTILES)
    if high <= low:
        high = low + 1.0
    values -= np.float32(low)
    values *= np.float32(1.0 / (high - low))
    np.clip(values, 0.0, 1.0, out=values)
    return values


def apply_voi(ds: Dataset, values: np.ndarray, padding: np.ndarray | None) -> tuple[np.ndarray, str, list[str]]:
    """Apply the first VOI LUT Sequence item, else the first window, else the fallback.

    Returns the values in [0, 1], the name of the step used and any warnings. A VOI LUT
    Sequence wins over Window Center/Width when both are present, as in pydicom's
    apply_voi_lut(prefer_lut=True); a malformed sequence falls back to the window.
    """
    warnings: list[str] = []
    window = window_parameters(ds)
    sequence = find_attribute(ds, "VOILUTSequence", "FrameVOILUTSequence")
    if sequence:
        try:
            return apply_voi_lut_item(values, sequence[0], ds), "VOI LUT Sequence", warnings
        except PixelDataError as err:
            if window is None:
                raise
            warnings.append(f"invalid VOI LUT Sequence ({err}); used Window Center/Width instead")

    if window is not None:
        center, width, function = window
        return apply_window(values, center, width, function), "window", warnings

    warnings.append(
        "no VOI LUT Sequence or Window Center/Width; stretched the "
        f"{FALLBACK_PERCENTILES[0]}th to {FALLBACK_PERCENTILES[1]}th percentile of non-padding pixels to [0, 1]"
    )
    return apply_fallback_window(values, padding), "fallback", warnings


def apply_polarity(ds: Dataset, values: np.ndarray) -> list[str]:
    """Invert MONOCHROME1 once, in place; return warnings for a contradicting Presentation LUT Shape.

    The DX and MG image modules require Presentation LUT Shape INVERSE with MONOCHROME1
    and IDENTITY with MONOCHROME2 (PS3.3 C.8.11.3), so INVERSE describes the same single
    inversion as MONOCHROME1 and is not applied a second time. Photometric
    Interpretation decides when the two disagree.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    warnings = []
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), values, out=values)
        if shape == "IDENTITY":
            warnings.append(
                "Presentation LUT Shape IDENTITY contradicts MONOCHROME1 (INVERSE expected); inverted once as MONOCHROME1"
            )
    elif shape == "INVERSE":
        warnings.append(
            "Presentation LUT Shape INVERSE contradicts MONOCHROME2 (IDENTITY expected); not inverted, as MONOCHROME2"
        )
    return warnings


def display_pixels(ds: Dataset) -> DisplayPixels:
    """Decode Pixel Data and apply Modality LUT, VOI and polarity; padding becomes 0."""
    return display_from_stored(ds, decode_stored_values(ds))


def display_from_stored(ds: Dataset, stored: np.ndarray) -> DisplayPixels:
    """Apply Modality LUT, VOI and polarity to decoded stored values; padding becomes 0."""
    padding = padding_mask(ds, stored)
    values = apply_modality_lut(ds, stored)
    del stored

    values, voi_source, warnings = apply_voi(ds, values, padding)
    warnings += apply_polarity(ds, values)
    if padding is not None:
        values[padding] = 0.0
    return DisplayPixels(values.astype(np.float32, copy=False), padding, voi_source, warnings)


# --------------------------------------------------------------------------- reduced resolution

# A reduced decode keeps its longest side at least this many pixels: four times the
# 128-pixel model input, so a breast that fills half the image still has twice the
# output resolution.
MIN_REDUCED_SIDE = 512
JPEG2000_SYNTAXES = (pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000)
NATIVE_LITTLE_ENDIAN_SYNTAXES = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
# Output rows that area_average sums per step, which bounds its temporary arrays.
AVERAGE_BAND_ROWS = 32
# Bits per sample of the Pillow modes a JPEG 2000 grayscale image decodes to.
PILLOW_MODE_BITS = {"L": 8, "I;16": 16}

# JPEG 2000 codestream markers (ITU-T T.800 Table A.2).
SOC, SIZ, COD, COC, SOT, SOD, EOC = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF90, 0xFF93, 0xFFD9


@dataclass
class ReducedDecoding:
    """Request for a reduced-resolution decode, and the record of the last decode made.

    ``factor`` is the number of stored pixels per decoded pixel along each axis, 1 for a
    full decode. ``reason`` says why an image was decoded in full although a reduced
    decode was requested; it is None when the image is too small to reduce.
    """

    min_side: int = MIN_REDUCED_SIDE
    factor: int = 1
    method: str = "full decode"
    reason: str | None = None
    source_shape: tuple[int, int] | None = None
    decoded_shape: tuple[int, int] | None = None

    @property
    def reduced(self) -> bool:
        return self.factor > 1

    def note(self) -> str | None:
        """Return one line for a result's warnings: the reduced decode, or why a full one was made."""
        if self.reduced and self.source_shape and self.decoded_shape:
            return (
                f"decoded at 1/{self.factor} resolution by {self.method}: "
                f"{self.decoded_shape[0]} x {self.decoded_shape[1]} of "
                f"{self.source_shape[0]} x {self.source_shape[1]} pixels"
            )
        if self.reason:
            return f"decoded at full resolution: {self.reason}"
        return None

    def source_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Map a ``(row0, col0, row1, col1)`` box of decoded pixels to stored pixels."""
        if not self.reduced or self.source_shape is None:
            return box
        rows, columns = self.source_shape
        row0, col0, row1, col1 = (value * self.factor for value in box)
        return (min(row0, rows), min(col0, columns), min(row1, rows), min(col1, columns))


_REDUCED_DECODING: ContextVar[ReducedDecoding | None] = ContextVar("reduced_decoding", default=None)


@contextmanager
def reduced_decoding(min_side: int = MIN_REDUCED_SIDE) -> Iterator[ReducedDecoding]:
    """Let ``decode_stored_values`` decode large images at a reduced resolution.

    Inside the block the resolution is divided by the largest power of two that keeps
    the longest side at least ``min_side``. JPEG 2000 images are decoded from the
    wavelet's low band at that level (Pillow's ``reduce``), and native little-endian
    images are averaged over blocks of that many pixels a side. Other images are
    decoded in full. The yielded record describes the last decode in the block. The
    setting belongs to the current thread (a ``ContextVar``).
    """
    if min_side < 1:
        raise ValueError(f"min_side is {min_side}; expected a positive number of pixels")
    request = ReducedDecoding(min_side=min_side)
    token = _REDUCED_DECODING.set(request)
    try:
        yield request
    finally:
        _REDUCED_DECODING.reset(token)


def decode_reduced(ds: Dataset, transfer_syntax: pydicom.uid.UID | None, request: ReducedDecoding) -> np.ndarray | None:
    """Return reduced stored values and record them in ``request``, or None for a full decode."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    request.factor, request.method, request.reason = 1, "full decode", None
    request.source_shape, request.decoded_shape = (rows, columns), None
    if max(rows, columns) < 2 * request.min_side:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        request.reason = f"Samples per Pixel is {ds.SamplesPerPixel}; reduced decoding needs 1"
        return None

    if transfer_syntax in JPEG2000_SYNTAXES:
        stored = jpeg2000_reduced(ds, request)
    elif transfer_syntax in NATIVE_LITTLE_ENDIAN_SYNTAXES:
        stored = native_reduced(ds, request)
    else:
        syntax = transfer_syntax.name if transfer_syntax is not None else "no Transfer Syntax UID"
        request.reason = f"no reduced decoder for {syntax}"
        return None
    if stored is None:
        return None

    expected = (ceil_divide(rows, request.factor), ceil_divide(columns, request.factor))
    if stored.shape != expected:
        request.factor, request.method = 1, "full decode"
        request.reason = f"the reduced decode has shape {stored.shape}, expected {expected}"
        logger.warning("Reduced decode of a %d x %d image: %s; decoding in full", rows, columns, request.reason)
        return None
    request.decoded_shape = expected
    return stored


def ceil_divide(value: int, divisor: int) -> int:
    return -(-value // divisor)


def reduction_factor(rows: int, columns: int, min_side: int, max_level: int | None = None) -> int:
    """Largest power of two (at most ``2**max_level``) that keeps the longest side at least ``min_side``."""
    level = 0
    while max_level is None or level < max_level:
        factor = 2 ** (level + 1)
        if max(ceil_divide(rows, factor), ceil_divide(columns, factor)) < min_side:
            break
        level += 1
    return 2**level


# ---------------------------------------------------------------- native (uncompressed) data


def native_reduced(ds: Dataset, request: ReducedDecoding) -> np.ndarray | None:
    """Average native stored values over factor x factor blocks, as float32.

    Each output pixel is the mean of the stored values of its block; blocks at the
    right and bottom edge may be smaller. Bits above Bits Stored are masked off as the
    full decode does. Signed data with fewer Bits Stored than Bits Allocated, and bit
    depths other than 8 and 16, are left to the full decode.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits_allocated not in (8, 16):
        request.reason = f"Bits Allocated is {bits_allocated}; reduced native decoding needs 8 or 16"
        return None
    if signed and bits_stored < bits_allocated:
        request.reason = f"signed pixels with Bits Stored {bits_stored} under Bits Allocated {bits_allocated}"
        return None

    factor = reduction_factor(rows, columns, request.min_side)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    raw = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns).reshape(rows, columns)
    mask = None
    if not signed and bits_stored < bits_allocated and int(raw.max()) >> bits_stored:
        mask = (1 << bits_stored) - 1
    stored = area_average(raw, factor, mask)
    request.factor, request.method = factor, f"averaging {factor} x {factor} blocks"
    return stored


def area_average(raw: np.ndarray, factor: int, mask: int | None = None) -> np.ndarray:
    """Mean of ``raw`` over factor x factor blocks (smaller at the right and bottom edge), as float32.

    The sums are made AVERAGE_BAND_ROWS output rows at a time, so no full-size
    temporary array exists besides ``raw``. ``mask``, when given, is ANDed with the values first.
    """
    rows, columns = raw.shape
    out_rows, out_columns = ceil_divide(rows, factor), ceil_divide(columns, factor)
    whole_columns = columns // factor
    # 16-bit values summed over up to 128 x 128 pixels fit in 32 bits.
    accumulator = np.uint32 if raw.dtype.kind == "u" and factor <= 128 else np.int64
    column_counts = np.full(out_columns, factor, dtype=np.float64)
    if whole_columns < out_columns:
        column_counts[-1] = columns - whole_columns * factor

    out = np.empty((out_rows, out_columns), dtype=np.float32)
    for start in range(0, out_rows, AVERAGE_BAND_ROWS):
        stop = min(out_rows, start + AVERAGE_BAND_ROWS)
        band = raw[start * factor : stop * factor]
        if mask is not None:
            band = band & mask
        whole_rows = band.shape[0] // factor
        row_sums = np.empty((stop - start, columns), dtype=accumulator)
        row_sums[:whole_rows] = band[: whole_rows * factor].reshape(whole_rows, factor, columns).sum(axis=1, dtype=accumulator)
        row_counts = np.full(stop - start, factor, dtype=np.float64)
        if whole_rows < stop - start:  # the last band ends in a partial block of rows
            row_sums[whole_rows] = band[whole_rows * factor :].sum(axis=0, dtype=accumulator)
            row_counts[whole_rows] = band.shape[0] - whole_rows * factor

        sums = np.empty((stop - start, out_columns), dtype=accumulator)
        sums[:, :whole_columns] = row_sums[:, : whole_columns * factor].reshape(-1, whole_columns, factor).sum(axis=2)
        if whole_columns < out_columns:
            sums[:, whole_columns] = row_sums[:, whole_columns * factor :].sum(axis=1)
        out[start:stop] = sums / (row_counts[:, None] * column_counts[None, :])
    return out


# ---------------------------------------------------------------- JPEG 2000


@dataclass(frozen=True)
class Jpeg2000Header:
    """Image parameters of a JPEG 2000 codestream (component 0)."""

    rows: int
    columns: int
    row_offset: int
    column_offset: int
    components: int
    precision: int
    signed: bool
    # Fewest wavelet decomposition levels of any COD or COC segment, main or tile-part header.
    decomposition_levels: int


def read_jpeg2000_header(codestream: bytes) -> Jpeg2000Header:
    """Read size, precision and decomposition levels from a JPEG 2000 codestream.

    Follows ITU-T T.800 Annex A. SIZ gives the image size and the precision and
    signedness of component 0. COD and COC segments of the main header and of every
    tile-part header give decomposition levels, and the fewest is returned because a
    reduced decode needs that level in every tile. Tile-part data is skipped by its
    length (Psot). Raises PixelDataError for a JP2 file or a malformed header.
    """
    data = memoryview(codestream)
    try:
        if struct.unpack_from(">HH", data, 0) != (SOC, SIZ):
            raise PixelDataError("not a JPEG 2000 codestream: it does not start with the SOC and SIZ markers")
        (siz_length,) = struct.unpack_from(">H", data, 4)
        columns, rows, column_offset, row_offset = struct.unpack_from(">IIII", data, 8)
        (components,) = struct.unpack_from(">H", data, 40)
        precision_byte = data[42]
        component_bytes = 1 if components < 257 else 2

        levels: list[int] = []
        position = 4 + siz_length
        position = read_coding_levels(data, position, SOT, component_bytes, levels)
        while position + 2 <= len(data):
            (marker,) = struct.unpack_from(">H", data, position)
            if marker == EOC:
                break
            if marker != SOT:
                raise PixelDataError(f"expected an SOT marker at byte {position} of the codestream, found 0x{marker:04X}")
            sot_length, _tile, tile_part_length = struct.unpack_from(">HHI", data, position + 2)
            read_coding_levels(data, position + 2 + sot_length, SOD, component_bytes, levels)
            if tile_part_length == 0:  # the last tile-part runs to the end of the codestream
                break
            position += tile_part_length
    except (struct.error, IndexError) as err:
        raise PixelDataError(f"truncated JPEG 2000 codestream header: {err}") from err
    if not levels:
        raise PixelDataError("JPEG 2000 codestream has no COD segment")
    return Jpeg2000Header(
        rows=rows - row_offset,
        columns=columns - column_offset,
        row_offset=row_offset,
        column_offset=column_offset,
        components=components,
        precision=(precision_byte & 0x7F) + 1,
        signed=bool(precision_byte & 0x80),
        decomposition_levels=min(levels),
    )


def read_coding_levels(data: memoryview, position: int, end_marker: int, component_bytes: int, levels: list[int]) -> int:
    """Append the decomposition levels of COD and COC (component 0) segments up to ``end_marker``; return its position."""
    while True:
        marker, length = struct.unpack_from(">HH", data, position)
        if marker == end_marker:
            return position
        if marker == COD:
            # Scod, then SGcod (progression order, layers, multiple component transform), then SPcod.
            levels.append(data[position + 9])
        elif marker == COC:
            component = int.from_bytes(data[position + 4 : position + 4 + component_bytes], "big")
            if component == 0:
                levels.append(data[position + 5 + component_bytes])
        if length < 2:
            raise PixelDataError(f"invalid marker segment length {length} at byte {position} of the codestream")
        position += 2 + length


ITEM_TAG = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER_TAG = (0xFFFE, 0xE0DD)


def single_frame(pixel_data: bytes) -> bytes:
    """Return the one frame of encapsulated Pixel Data: its fragments joined (PS3.5 A.4).

    The first item is the Basic Offset Table and is skipped. A frame in one fragment is
    sliced once, where pydicom's ``generate_frames`` reads it through a file object.
    """
    fragments = []
    position = 0
    first = True
    while position + 8 <= len(pixel_data):
        group, element, length = struct.unpack_from("<HHI", pixel_data, position)
        if (group, element) == SEQUENCE_DELIMITER_TAG:
            break
        if (group, element) != ITEM_TAG:
            raise PixelDataError(f"expected an item tag (FFFE,E000) at byte {position} of the encapsulated Pixel Data")
        if position + 8 + length > len(pixel_data):
            raise PixelDataError(f"the item at byte {position} of the encapsulated Pixel Data runs past its end")
        if not first:
            fragments.append((position + 8, length))
        first = False
        position += 8 + length
    if not fragments:
        raise PixelDataError("the encapsulated Pixel Data contains no fragment")
    if len(fragments) == 1:
        start, length = fragments[0]
        return pixel_data[start : start + length]
    return b"".join(pixel_data[start : start + length] for start, length in fragments)


def pillow_reduced_size(length: int, level: int) -> int:
    """Side length Pillow 13 allots to a JPEG 2000 image reduced by ``level``: rounded, not ceiled."""
    power = 1 << level
    return (length + (power >> 1)) // power


def jpeg2000_level(rows: int, columns: int, min_side: int, max_level: int) -> int:
    """Largest reduction level (at most ``max_level``) that keeps the longest side at least
    ``min_side`` and where Pillow's size matches the size OpenJPEG decodes."""
    level = 0
    for candidate in range(1, max_level + 1):
        factor = 1 << candidate
        if max(ceil_divide(rows, factor), ceil_divide(columns, factor)) < min_side:
            break
        # NOTE: Pillow rounds the reduced size where OpenJPEG takes the ceiling; at a level
        # where they differ Pillow rejects the decoded data, so that level is skipped.
        if all(pillow_reduced_size(side, candidate) == ceil_divide(side, factor) for side in (rows, columns)):
            level = candidate
    return level


def jpeg2000_reduced(ds: Dataset, request: ReducedDecoding) -> np.ndarray | None:
    """Decode the low band of a JPEG 2000 frame at the chosen level, as stored values."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    try:
        frame = single_frame(ds.PixelData)
        header = read_jpeg2000_header(frame)
    except ValueError as err:  # PixelDataError is a ValueError
        request.reason = f"the JPEG 2000 header could not be read ({err})"
        return None

    problem = None
    if header.components != 1:
        problem = f"the codestream has {header.components} components"
    elif header.signed:
        problem = "the codestream has signed samples"
    elif header.row_offset or header.column_offset:
        problem = "the codestream has an image offset"
    elif (header.rows, header.columns) != (rows, columns):
        problem = f"the codestream is {header.rows} x {header.columns} but Rows x Columns is {rows} x {columns}"
    elif header.precision != int(ds.get("BitsStored") or header.precision) or header.precision > 16:
        problem = f"the codestream precision {header.precision} differs from Bits Stored {ds.get('BitsStored')}"
    if problem is not None:
        request.reason = problem
        return None

    level = jpeg2000_level(rows, columns, request.min_side, header.decomposition_levels)
    if level == 0:
        request.reason = f"the codestream has {header.decomposition_levels} decomposition levels, too few to reduce"
        return None
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as picture:
            picture.reduce = level
            picture.load()
            mode = picture.mode
            decoded = np.asarray(picture)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        request.reason = f"the reduced JPEG 2000 decode failed ({err})"
        logger.warning("Reduced JPEG 2000 decode of a %d x %d image failed (%s); decoding in full", rows, columns, err)
        return None
    if mode not in PILLOW_MODE_BITS:
        request.reason = f"Pillow decoded the codestream to mode {mode}; expected one of {', '.join(PILLOW_MODE_BITS)}"
        return None

    # Pillow shifts samples left to fill its 8 or 16 bits; shift them back.
    shift = PILLOW_MODE_BITS[mode] - header.precision
    stored = (decoded >> shift if shift else decoded).astype(np.uint16)
    request.factor, request.method = 1 << level, f"JPEG 2000 resolution level {level}"
    return stored

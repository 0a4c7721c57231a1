"""Turn the Pixel Data of a mammogram into display values in [0, 1].

The steps follow the grayscale pipeline of DICOM PS3.3 C.11: decode, Modality LUT,
VOI LUT, then polarity (MONOCHROME1 is inverted once). The result is float32 with 0 for
black and 1 for white as a MONOCHROME2 display would show it, plus a mask of the pixels
marked as padding by Pixel Padding Value (0028,0120) and Pixel Padding Range Limit
(0028,0121).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pydicom
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

    Raises PixelDataError naming the fault: missing Pixel Data, a length that disagrees
    with Rows, Columns and Bits Allocated, or a decoder failure.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError("float Pixel Data is not supported; expected integer Pixel Data (7FE0,0010)")
        raise PixelDataError("missing Pixel Data (7FE0,0010)")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise PixelDataError(f"missing {keyword}, which is needed to decode Pixel Data")

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    is_native = transfer_syntax is None or not transfer_syntax.is_compressed
    if is_native:
        check_native_length(ds)

    try:
        if transfer_syntax is None:
            stored = ds.pixel_array
        else:
            # The decoder, unlike Dataset.pixel_array, keeps no copy on the dataset.
            stored, _ = get_decoder(transfer_syntax).as_array(ds, index=0)
    except Exception as err:  # pydicom and its plugins raise many exception types
        syntax = transfer_syntax.name if transfer_syntax is not None else "unknown transfer syntax"
        raise PixelDataError(f"failed to decode Pixel Data ({syntax}): {err}") from err

    expected_shape = (int(ds.Rows), int(ds.Columns))
    if stored.shape != expected_shape:
        raise PixelDataError(
            f"decoded Pixel Data has shape {stored.shape} but Rows x Columns is "
            f"{expected_shape[0]} x {expected_shape[1]}"
        )
    return stored


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

"""Full against reduced-resolution decoding of the full-field test study, and how far the results differ."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pydicom

from bench.config import BenchConfig
from bench.images import ENCODINGS, StudyFiles
from bench.report import Section, median, ratio
from model.dicom_pixels import MIN_REDUCED_SIDE, ReducedDecoding, reduced_decoding
from model.preprocess import OUTPUT_SIZE, PreprocessedView, preprocess_dataset
from model.scoring import Scorer

logger = logging.getLogger(__name__)

# The bounds tests/test_fast_decode.py enforces on one full-field view; keep both equal.
MEAN_ABSOLUTE_TOLERANCE = 0.01
P99_ABSOLUTE_TOLERANCE = 0.12
Z_SCORE_TOLERANCE = 0.15


@dataclass
class DecodeRun:
    view: PreprocessedView
    decode_ms: float
    preprocess_ms: float
    decoding: ReducedDecoding | None = None

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms


def preprocess_once(path, reduced: bool, size: int = OUTPUT_SIZE) -> DecodeRun:
    """Read the file (untimed), then decode and preprocess it to ``size`` pixels, timed by preprocess_dataset.

    The reduced decode keeps its longest side at MIN_REDUCED_SIDE pixels per 128 pixels of
    ``size``, as the worker does.
    """
    ds = pydicom.dcmread(path)
    timings: dict[str, float] = {}
    if not reduced:
        view = preprocess_dataset(ds, size=size, timings=timings)
        return DecodeRun(view, timings["decode_ms"], timings["preprocess_ms"])
    with reduced_decoding(MIN_REDUCED_SIDE * size // OUTPUT_SIZE) as decoding:
        view = preprocess_dataset(ds, size=size, timings=timings)
    return DecodeRun(view, timings["decode_ms"], timings["preprocess_ms"], decoding)


def run(config: BenchConfig, studies: dict[str, StudyFiles]) -> Section:
    section = Section(
        "2a. Decoding: full against reduced resolution",
        "a 128 x 128 model input needs only a wavelet level of the JPEG 2000 image (or block averages of "
        "uncompressed data) whose longest side stays at least 512 pixels; the reduced path must agree with "
        "the full decode within the tolerances of tests/test_fast_decode.py.",
    )
    scorer = Scorer(config.checkpoint, backend="torch")
    size = scorer.view_size
    timing = section.table(
        f"Per view of the study ({config.shape[0]} x {config.shape[1]}, 12 bits), medians of "
        f"{config.decode_repeats} runs each, in ms; decode is Pixel Data to stored values, preprocess the rest "
        "of model.preprocess.preprocess_dataset:",
        ["encoding", "view", "full decode", "full preprocess", "reduced decode", "reduced preprocess", "speed-up", "reduced path"],
    )
    agreement = section.table(
        "Difference between the two paths on the same view (model input in [0, 1]; scores of the checkpoint "
        "used by this run):",
        ["encoding", "view", "mean abs", "99th pct abs", "max abs", "crop box shift px", "score full", "score reduced", "Δz", "within bounds"],
    )
    summary: dict[str, dict[str, float | None]] = {}
    z_differences = []
    for encoding in ENCODINGS:
        full_totals, reduced_totals = [], []
        for path in studies[encoding].paths[: config.timed_views]:
            view_name = path.stem.split("-")[-2]
            # A full JPEG 2000 decode takes seconds, so it is repeated once less.
            full_runs = [preprocess_once(path, False, size) for _ in range(max(1, config.decode_repeats - 1))]
            reduced_runs = [preprocess_once(path, True, size) for _ in range(config.decode_repeats)]
            full, reduced = full_runs[0], reduced_runs[0]
            full_total = median(run.total_ms for run in full_runs)
            reduced_total = median(run.total_ms for run in reduced_runs)
            full_totals.append(full_total)
            reduced_totals.append(reduced_total)
            timing.add(
                encoding,
                view_name,
                median(run.decode_ms for run in full_runs),
                median(run.preprocess_ms for run in full_runs),
                median(run.decode_ms for run in reduced_runs),
                median(run.preprocess_ms for run in reduced_runs),
                speed_up(full_total, reduced_total),
                (reduced.decoding.note() if reduced.decoding else None) or "full decode",
            )

            difference = np.abs(full.view.image - reduced.view.image)
            full_box = full.view.metadata.crop_box
            reduced_box = reduced.decoding.source_box(reduced.view.metadata.crop_box) if reduced.decoding else reduced.view.metadata.crop_box
            shift = max(abs(a - b) for a, b in zip(full_box, reduced_box))
            lateral, position = full.view.metadata.laterality, full.view.metadata.view_position
            full_score = scorer.score(full.view.image, lateral, position)
            reduced_score = scorer.score(reduced.view.image, lateral, position)
            dz = None
            if full_score.z_score is not None and reduced_score.z_score is not None:
                dz = reduced_score.z_score - full_score.z_score
                z_differences.append(abs(dz))
            mean_abs, p99_abs = float(difference.mean()), float(np.percentile(difference, 99))
            within = (
                mean_abs <= MEAN_ABSOLUTE_TOLERANCE
                and p99_abs <= P99_ABSOLUTE_TOLERANCE
                and (dz is None or abs(dz) <= Z_SCORE_TOLERANCE)
            )
            agreement.add(
                encoding,
                view_name,
                mean_abs,
                p99_abs,
                float(difference.max()),
                shift,
                full_score.reconstruction_error,
                reduced_score.reconstruction_error,
                dz,
                "yes" if within else "no",
            )
        summary[encoding] = {"full_ms": median(full_totals), "reduced_ms": median(reduced_totals)}

    for encoding, values in summary.items():
        section.notes.append(
            f"{encoding}: median decode and preprocess {values['full_ms']:.0f} ms in full, "
            f"{values['reduced_ms']:.0f} ms reduced; full over reduced {speed_up(values['full_ms'], values['reduced_ms'])}."
        )
    section.notes.append(
        f"Tolerance between the worker (reduced) and the training cache (full decode) for one view, as "
        f"tests/test_fast_decode.py enforces it on real mini-MIAS pixels: mean absolute difference of the model "
        f"input at most {MEAN_ABSOLUTE_TOLERANCE}, 99th percentile at most {P99_ABSOLUTE_TOLERANCE}, crop box within "
        f"two decoded pixels, and |Δz| at most {Z_SCORE_TOLERANCE} healthy standard deviations with the shipped "
        "checkpoint. Single pixels at the breast edge can differ by more (max abs)."
    )
    section.notes.append(
        "The reduced path applies the VOI window (SIGMOID for these GE headers) to averaged stored values "
        "instead of averaging windowed values, and JPEG 2000's 5/3 low band is a smoothed rather than a "
        "box-averaged image; both move the model input slightly. The crop box is found on a grid anchored at "
        "the reduced image's content box, so it can shift by up to two reduced pixels (16 stored pixels at "
        "1/8), which moves the breast edge by a fraction of an output pixel. Δz is the change of the z-score "
        f"in units of the calibration's healthy standard deviation; the largest |Δz| here is "
        f"{max(z_differences) if z_differences else float('nan'):.3f}."
    )
    config.results["decode"] = summary
    config.results["max_abs_dz"] = max(z_differences) if z_differences else None
    return section


def speed_up(full_ms: float | None, reduced_ms: float | None) -> str:
    value = ratio(full_ms, reduced_ms)
    if value is None:
        return "—"
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"

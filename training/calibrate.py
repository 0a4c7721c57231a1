"""Calibrate a checkpoint on held-out healthy views and store the statistics in it.

The score is the one the checkpoint names (``score_name``), computed by
``model.scoring.Scorer``, the same path the worker scores with. By default the
healthy images of the validation patients recorded in the checkpoint are used. For a
pairwise (``contra_``) score each healthy view is calibrated on its per-view score
minus that of the same view of the woman's other breast, whether that view is healthy
or not. A healthy view without such a partner is left out.

Usage::

    python -m training.calibrate --checkpoint runs/mias/model.pt \\
        --data-format mini-mias --data data/mini-mias
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.scoring import THRESHOLD_RULES, Scorer, build_calibration, calibration_group, pairwise_value
from training.cache import CachedImages, load_or_build_cache
from training.crossval import partner_indices
from training.cli import add_data_arguments, check_threads, configure_logging, records_from_arguments
from training.data import ImageRecord, PatientSplit
from training.loop import read_checkpoint_dict, write_checkpoint_dict

logger = logging.getLogger(__name__)

SCORE_BATCH = 32
SUBSETS = ("validation", "all")


def score_images(checkpoint: Checkpoint, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Per-view scores of ``(N, S, S)`` images, in batches: the pairwise score's base score for a ``contra_`` score."""
    scorer = Scorer(checkpoint, threads=threads)
    scores = [scorer.score_values(images[start : start + SCORE_BATCH]) for start in range(0, len(images), SCORE_BATCH)]
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float64)


def score_records(
    checkpoint: Checkpoint,
    records: Sequence[ImageRecord],
    cache: CachedImages,
    record_indices: Sequence[int],
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Score the given cached records with the checkpoint's score.

    Returns the images, the scores and the record indices that were scored. For a
    pairwise score a record's score is its per-view score minus that of the same view
    of the other breast (see ``training.crossval.partner_indices``), and records whose
    partner is missing or was rejected by preprocessing are left out.
    """
    images, kept = cache.select(record_indices)
    if not Scorer(checkpoint, threads=threads).pairwise:
        return images, score_images(checkpoint, images, threads=threads), kept

    partners = partner_indices(records)
    _, available = cache.select(range(len(records)))
    available_set = set(available)
    paired = [index for index in kept if partners[index] >= 0 and int(partners[index]) in available_set]
    if len(paired) < len(kept):
        logger.warning(
            "%d of %d views are left out because the other breast's same view is missing",
            len(kept) - len(paired),
            len(kept),
        )
    needed = sorted(set(paired) | {int(partners[index]) for index in paired})
    needed_images, needed_kept = cache.select(needed)
    values = dict(zip(needed_kept, score_images(checkpoint, needed_images, threads=threads).tolist()))
    scores = np.array([pairwise_value(values[index], values[int(partners[index])]) for index in paired])
    paired_images, _ = cache.select(paired)
    return paired_images, scores.astype(np.float64), paired


def calibration_record_indices(
    records: Sequence[ImageRecord], split: dict[str, Any] | None, subset: str = "validation"
) -> list[int]:
    """Indices of the healthy records to calibrate on: the validation patients', or all."""
    if subset == "all":
        return [index for index, record in enumerate(records) if record.healthy]
    if subset != "validation":
        raise ValueError(f"calibration subset {subset!r} is not one of {list(SUBSETS)}")
    if not split:
        raise ValueError("the checkpoint records no patient split; calibrate with --subset all on held-out healthy data")
    return PatientSplit.from_dict(split).select(records, "validation", healthy_only=True)


def calibrate(
    checkpoint: Checkpoint,
    cache: CachedImages,
    record_indices: Sequence[int],
    threshold_rule: str = "specificity",
    specificity: float = 0.95,
    threads: int | None = None,
    records: Sequence[ImageRecord] | None = None,
) -> dict[str, Any]:
    """Score the given cached records and build the calibration statistics.

    A pairwise score needs ``records``, every record of the cache, to find each view's partner.
    """
    if records is None:
        if Scorer(checkpoint, threads=threads).pairwise:
            raise ValueError(f"score {checkpoint.score_name!r} is pairwise, so calibrate needs the records")
        records = []
    _, scores, kept = score_records(checkpoint, records, cache, record_indices, threads)
    if not kept:
        raise ValueError(
            "no healthy image to calibrate on: the selected patients have no preprocessed healthy view"
            " (with its other breast's view, for a pairwise score)"
        )
    groups = [calibration_group(*cache.view_of(index)) for index in kept]
    calibration = build_calibration(
        scores.tolist(), groups, score_name=checkpoint.score_name, threshold_rule=threshold_rule, specificity=specificity
    )
    overall = calibration["overall"]
    logger.info(
        "calibrated on %d healthy views: mean %.5f, std %.5f, %.0f%% quantile %.5f",
        overall["count"],
        overall["mean"],
        overall["std"],
        100 * specificity,
        overall["specificity_quantile"],
    )
    return calibration


def store_calibration(path: str | Path, calibration: dict[str, Any]) -> Path:
    """Rewrite the checkpoint file atomically with ``calibration``, keeping every other entry."""
    payload = read_checkpoint_dict(path)
    payload["calibration"] = calibration
    return write_checkpoint_dict(payload, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.calibrate",
        description="Score held-out healthy views with a checkpoint and store the calibration in it.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file to calibrate in place")
    add_data_arguments(parser)
    parser.add_argument(
        "--subset", choices=SUBSETS, default="validation",
        help="healthy images to use: those of the checkpoint's validation patients (default), "
        "or every healthy image of --data, for data the model never saw",
    )
    parser.add_argument(
        "--threshold-rule", choices=THRESHOLD_RULES, default="specificity",
        help="rule the worker applies by default: above the healthy mean, or above the specificity quantile",
    )
    parser.add_argument(
        "--specificity", type=float, default=0.95, help="healthy quantile of the 'specificity' rule (default 0.95)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    threads = check_threads(args.threads)
    torch.set_num_threads(threads)

    checkpoint = load_checkpoint(args.checkpoint)
    records = records_from_arguments(args)
    cache_dir = args.cache_dir or args.checkpoint.resolve().parent / "cache"
    view_size = Scorer(checkpoint, threads=threads).view_size
    cache = load_or_build_cache(records, cache_dir, size=view_size, threads=threads)
    indices = calibration_record_indices(records, checkpoint.split, args.subset)
    calibration = calibrate(checkpoint, cache, indices, args.threshold_rule, args.specificity, threads, records)
    store_calibration(args.checkpoint, calibration)
    logger.info("stored the calibration in %s", args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())

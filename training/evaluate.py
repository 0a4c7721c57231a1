"""Score a checkpoint's held-out test patients and report detection metrics.

Every image of the test patients recorded in the checkpoint is scored, normal and
abnormal. The result is printed as one JSON line on stdout and written, with
``roc.png`` and ``reconstructions.png``, to ``--out``.

Usage::

    python -m training.evaluate --checkpoint runs/mias/model.pt \\
        --data-format mini-mias --data data/mini-mias
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, recall_score, roc_auc_score, roc_curve

from model.checkpoint import Checkpoint, default_checkpoint_path, load_checkpoint
from model.scoring import THRESHOLD_RULES, Scorer, calibration_group, statistics_for, threshold_for
from training.cache import CachedImages, load_or_build_cache
from training.calibrate import score_records
from training.cli import add_data_arguments, check_threads, configure_logging, records_from_arguments
from training.data import MIAS_CLASSES, ImageRecord, PatientSplit
from training.plots import ReconstructionRow, RocCurve, plot_reconstructions, plot_roc

logger = logging.getLogger(__name__)

GRID_IMAGES_PER_LABEL = 4


@dataclass
class TestScores:
    """Scores of the test images that preprocessing accepted, in record order."""

    records: list[ImageRecord]
    images: np.ndarray  # (N, H, W)
    groups: list[str]  # calibration group of each image, such as "L-MLO"
    scores: np.ndarray  # (N,) the checkpoint's score
    labels: np.ndarray  # (N,) 1 abnormal, 0 healthy


def score_split(
    checkpoint: Checkpoint,
    records: Sequence[ImageRecord],
    cache: CachedImages,
    threads: int | None,
    split_name: str = "test",
) -> TestScores:
    """Score every image of the checkpoint's patients in ``split_name``, normal and abnormal.

    For a pairwise score, images without the other breast's same view are left out.
    """
    if not checkpoint.split:
        raise ValueError("the checkpoint records no patient split, so it has no held-out patients")
    split = PatientSplit.from_dict(checkpoint.split)
    images, scores, kept = score_records(checkpoint, records, cache, split.select(records, split_name), threads)
    if not kept:
        raise ValueError(
            f"none of the checkpoint's {len(getattr(split, split_name))} {split_name} patients is in --data; "
            "evaluate on the data set the checkpoint was trained on"
        )
    chosen = [records[index] for index in kept]
    return TestScores(
        records=chosen,
        images=images,
        groups=[calibration_group(*cache.view_of(index)) for index in kept],
        scores=scores,
        labels=np.array([0 if record.healthy else 1 for record in chosen], dtype=np.int64),
    )


def auroc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC, or None when only one class is present."""
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def patient_bootstrap_auroc(
    test: TestScores, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of the AUROC over resamples of whole patients with replacement.

    Patients, not images, are resampled because the two films of a woman are
    correlated. Resamples with only one class are skipped.
    """
    if resamples < 1:
        return None
    by_patient: dict[str, list[int]] = {}
    for index, record in enumerate(test.records):
        by_patient.setdefault(record.patient_id, []).append(index)
    groups = [np.array(indices) for _, indices in sorted(by_patient.items())]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picked = rng.integers(0, len(groups), size=len(groups))
        indices = np.concatenate([groups[i] for i in picked])
        value = auroc_or_none(test.labels[indices], test.scores[indices])
        if value is not None:
            values.append(value)
    if not values:
        return None
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def class_names(records: Sequence[ImageRecord]) -> list[str]:
    """Return the mini-MIAS classes found, in their usual order, then any other class, sorted."""
    found = {name for record in records for name in record.abnormality_classes}
    return [name for name in MIAS_CLASSES if name in found] + sorted(found - set(MIAS_CLASSES))


def per_class_auroc(test: TestScores) -> dict[str, dict[str, Any]]:
    """AUROC of each abnormality class's images against all healthy test images."""
    healthy = test.labels == 0
    result = {}
    for name in class_names(test.records):
        members = np.array([name in record.abnormality_classes for record in test.records])
        chosen = healthy | members
        result[name] = {
            "auroc": auroc_or_none(test.labels[chosen], test.scores[chosen]),
            "abnormal_images": int(members.sum()),
        }
    return result


def rate_or_none(labels: np.ndarray, predicted: np.ndarray, positive: int) -> float | None:
    """Recall of class ``positive`` (sensitivity for 1, specificity for 0), None without such images."""
    if not (labels == positive).any():
        return None
    return float(recall_score(labels, predicted, pos_label=positive))


def threshold_metrics(test: TestScores, calibration: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity when each threshold rule flags the images as the worker would."""
    if not calibration:
        return {}
    result = {}
    for rule in THRESHOLD_RULES:
        thresholds = np.array(
            [threshold_for(statistics_for(calibration, group)[1], rule) for group in test.groups]
        )
        predicted = (test.scores > thresholds).astype(np.int64)
        result[rule] = {
            "sensitivity": rate_or_none(test.labels, predicted, positive=1),
            "specificity": rate_or_none(test.labels, predicted, positive=0),
            "flagged_images": int(predicted.sum()),
        }
    return result


def summarize(test: TestScores, checkpoint: Checkpoint, resamples: int, seed: int) -> dict[str, Any]:
    """Compute every metric of the evaluation as a JSON-ready dictionary."""
    auroc = auroc_or_none(test.labels, test.scores)
    has_both = auroc is not None
    interval = patient_bootstrap_auroc(test, resamples, seed) if has_both else None
    return {
        "model_version": checkpoint.model_version,
        "score": checkpoint.score_name,
        "auroc": auroc,
        "auroc_ci95": list(interval) if interval else None,
        "auprc": float(average_precision_score(test.labels, test.scores)) if has_both else None,
        "per_class_auroc": per_class_auroc(test),
        "thresholds": threshold_metrics(test, checkpoint.calibration),
        "counts": {
            "patients": len({record.patient_id for record in test.records}),
            "healthy_images": int((test.labels == 0).sum()),
            "abnormal_images": int((test.labels == 1).sum()),
        },
        "bootstrap": {"resamples": resamples, "unit": "patient", "seed": seed},
    }


def roc_curves(test: TestScores) -> list[RocCurve]:
    curves = []
    healthy = test.labels == 0
    subsets = [("all abnormal", np.ones(len(test.records), dtype=bool))]
    subsets += [
        (name, healthy | np.array([name in record.abnormality_classes for record in test.records]))
        for name in class_names(test.records)
    ]
    for label, chosen in subsets:
        auroc = auroc_or_none(test.labels[chosen], test.scores[chosen])
        if auroc is None:
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(test.labels[chosen], test.scores[chosen])
        curves.append(RocCurve(label, false_positive_rate, true_positive_rate, auroc))
    return curves


def reconstruction_rows(test: TestScores, checkpoint: Checkpoint) -> list[ReconstructionRow]:
    """Rows for the first few healthy and abnormal test images, by image id."""
    order = sorted(range(len(test.records)), key=lambda index: test.records[index].image_id)
    chosen = [index for index in order if test.labels[index] == 0][:GRID_IMAGES_PER_LABEL]
    chosen += [index for index in order if test.labels[index] == 1][:GRID_IMAGES_PER_LABEL]
    if not chosen:
        return []
    scorer = Scorer(checkpoint)
    maps = [scorer.view_maps(test.images[index]) for index in chosen]
    reconstructions = [view.reconstruction for view in maps]
    error_maps = [view.squared_error for view in maps]
    rows = []
    for position, index in enumerate(chosen):
        record = test.records[index]
        label = ", ".join(record.abnormality_classes) or "normal"
        rows.append(
            ReconstructionRow(
                title=f"{record.image_id} {label}\nscore {test.scores[index]:.4f}",
                original=test.images[index],
                reconstruction=reconstructions[position],
                error_map=error_maps[position],
            )
        )
    return rows


def write_outputs(test: TestScores, checkpoint: Checkpoint, result: dict[str, Any], out: Path) -> None:
    """Write evaluation.json, roc.png and reconstructions.png, with "-validation" before the suffix for that split."""
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if result["split"] == "test" else f"-{result['split']}"
    (out / f"evaluation{tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    curves = roc_curves(test)
    if curves:
        plot_roc(curves, out / f"roc{tag}.png", title=f"{result['split']} patients, model {checkpoint.model_version}")
    rows = reconstruction_rows(test, checkpoint)
    if rows:
        plot_reconstructions(rows, out / f"reconstructions{tag}.png")
    logger.info("wrote evaluation%s.json, roc%s.png and reconstructions%s.png to %s", tag, tag, tag, out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Score the checkpoint's held-out test patients and print the metrics as one JSON line.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint written by training.fit")
    add_data_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=None,
        help="folder for evaluation.json, roc.png and reconstructions.png (default: the checkpoint's folder, "
        "or ./evaluation-default for the shipped checkpoint)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="patient-level bootstrap resamples for the AUROC interval (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--split", choices=("test", "validation"), default="test",
        help="patients to score: the held-out test patients (default), or the validation patients, "
        "whose abnormal images are also unseen, for choosing between models without touching the test set",
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    threads = check_threads(args.threads)
    torch.set_num_threads(threads)

    checkpoint = load_checkpoint(args.checkpoint)
    records = records_from_arguments(args)
    checkpoint_dir = args.checkpoint.resolve().parent
    if checkpoint_dir == default_checkpoint_path().resolve().parent:
        # The shipped checkpoint lies inside the installed package: write beside the caller instead.
        checkpoint_dir = Path("evaluation-default").resolve()
        logger.info("writing outputs and the cache under %s", checkpoint_dir)
    view_size = Scorer(checkpoint, threads=threads).view_size
    cache = load_or_build_cache(records, args.cache_dir or checkpoint_dir / "cache", size=view_size, threads=threads)
    test = score_split(checkpoint, records, cache, threads, args.split)
    result = {"split": args.split, **summarize(test, checkpoint, args.bootstrap, args.seed)}
    if result["auroc"] is None:
        logger.warning("the test images are all of one label, so AUROC and AUPRC are undefined")
    write_outputs(test, checkpoint, result, args.out or checkpoint_dir)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Metrics and figures of a cross-validation run (``training.crossval``).

AUROC and AUPRC come from scikit-learn. Intervals are 95% percentile bootstrap
intervals over views: the test views of each fold are resampled with replacement,
and resamples with only one label are skipped. Scores of different folds come from
different models, so pooled metrics use each fold's scores standardised by the mean
and standard deviation of that fold's healthy reference views.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from training.data import MIAS_CLASSES, ImageRecord
from training.plots import RocCurve, plot_roc

import matplotlib.pyplot as plt  # noqa: E402 - training.plots selects the Agg backend first

if TYPE_CHECKING:
    from training.crossval import FoldResult

logger = logging.getLogger(__name__)

MASS_CLASSES = ("CIRC", "SPIC", "MISC")
LEVEL = 0.95
# At most this many curves in roc.png.
MAX_ROC_CURVES = 8
MAP_ROWS_PER_GROUP = 4

def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC, or None when only one label is present."""
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision, or None when only one label is present."""
    if len(np.unique(labels)) < 2:
        return None
    return float(average_precision_score(labels, scores))


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` ``(B, N)`` with labels ``(B, N)``: the Mann-Whitney U statistic.

    Ties count one half, as in scikit-learn's ``roc_auc_score``; rows with one label give NaN.
    """
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), values, np.nan)


def interval(values: np.ndarray) -> list[float] | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - LEVEL) / 2.0
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))]


def resample_indices(groups: Sequence[np.ndarray], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each group of view indices, ``(resamples, size)`` indices drawn with replacement."""
    return [group[rng.integers(0, len(group), size=(resamples, len(group)))] for group in groups]


def bootstrap_auprc(labels: np.ndarray, scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    values = np.full(len(draws), np.nan)
    for row, indices in enumerate(draws):
        value = auprc(labels[indices], scores[indices])
        if value is not None:
            values[row] = value
    return values


# --------------------------------------------------------------------------- per score


def standardized(result: FoldResult, name: str, records: Sequence[ImageRecord]) -> np.ndarray:
    """Scores of one fold standardised by its healthy reference views' mean and standard deviation."""
    values = result.scores[name]
    healthy = np.array([(role == "reference") and record.healthy for role, record in zip(result.roles, records)])
    reference = values[healthy & np.isfinite(values)]
    if reference.size < 2:
        return values
    spread = reference.std(ddof=1)
    return (values - reference.mean()) / (spread if spread > 0 else 1.0)


def threshold_rates(
    records: Sequence[ImageRecord], results: Sequence[FoldResult], name: str, specificity: float
) -> dict[str, Any]:
    """Sensitivity and specificity on the test views at each fold's calibrated threshold.

    The threshold is the ``specificity`` quantile of the fold's healthy reference
    scores, the rule the worker's ``specificity`` threshold applies.
    """
    labels = np.array([0 if record.healthy else 1 for record in records])
    flagged_abnormal = flagged_healthy = abnormal = healthy = 0
    for result in results:
        values = result.scores[name]
        reference = np.array(
            [(role == "reference") and record.healthy for role, record in zip(result.roles, records)]
        ) & np.isfinite(values)
        test = (result.roles == "test") & np.isfinite(values)
        if not reference.any():
            continue
        threshold = np.quantile(values[reference], specificity)
        flagged = values > threshold
        flagged_abnormal += int((flagged & test & (labels == 1)).sum())
        flagged_healthy += int((flagged & test & (labels == 0)).sum())
        abnormal += int((test & (labels == 1)).sum())
        healthy += int((test & (labels == 0)).sum())
    return {
        "target_specificity": specificity,
        "sensitivity": flagged_abnormal / abnormal if abnormal else None,
        "specificity": 1.0 - flagged_healthy / healthy if healthy else None,
        "abnormal_views": abnormal,
        "healthy_views": healthy,
    }


def class_members(records: Sequence[ImageRecord], classes: Sequence[str]) -> np.ndarray:
    return np.array([any(name in record.abnormality_classes for name in classes) for record in records])


def score_metrics(
    records: Sequence[ImageRecord],
    results: Sequence[FoldResult],
    name: str,
    resamples: int,
    seed: int,
    specificity: float,
    with_auprc_intervals: bool = True,
) -> dict[str, Any]:
    """Compute every metric of one score over the test folds, and its inner AUROC per fold."""
    labels = np.array([0 if record.healthy else 1 for record in records])
    rng = np.random.default_rng(seed)
    tests = [np.flatnonzero((result.roles == "test") & np.isfinite(result.scores[name])) for result in results]
    draws = resample_indices(tests, resamples, rng) if resamples else [np.empty((0, len(t)), dtype=np.int64) for t in tests]

    fold_auroc, fold_auprc, fold_auroc_ci, fold_auprc_ci, fold_boot = [], [], [], [], []
    for result, test, draw in zip(results, tests, draws):
        values = result.scores[name]
        fold_auroc.append(auroc(labels[test], values[test]))
        fold_auprc.append(auprc(labels[test], values[test]))
        boot = rank_auroc(labels[draw], values[draw]) if resamples else np.empty(0)
        fold_boot.append(boot)
        fold_auroc_ci.append(interval(boot))
        fold_auprc_ci.append(interval(bootstrap_auprc(labels, values, draw)) if with_auprc_intervals and resamples else None)

    defined = [value for value in fold_auroc if value is not None]
    mean_boot = np.nanmean(np.stack(fold_boot), axis=0) if resamples and defined else np.empty(0)

    pooled_values = np.concatenate([standardized(result, name, records)[test] for result, test in zip(results, tests)])
    pooled_labels = np.concatenate([labels[test] for test in tests])
    pooled_records = [records[index] for test in tests for index in test]
    pooled_draw = rng.integers(0, len(pooled_values), size=(resamples, len(pooled_values)))

    per_class = {}
    healthy = pooled_labels == 0
    for class_name in [*MIAS_CLASSES, "masses"]:
        members = class_members(pooled_records, MASS_CLASSES if class_name == "masses" else [class_name])
        if not members.any():
            continue
        chosen = np.flatnonzero(healthy | members)
        draw = chosen[rng.integers(0, len(chosen), size=(resamples, len(chosen)))]
        per_class[class_name] = {
            "auroc": auroc(pooled_labels[chosen], pooled_values[chosen]),
            "auroc_ci95": interval(rank_auroc(pooled_labels[draw], pooled_values[draw])) if resamples else None,
            "abnormal_views": int(members.sum()),
        }

    inner = [inner_auroc(records, result, name) for result in results]
    inner_defined = [value for value in inner if value is not None]
    return {
        "auroc_mean": float(np.mean(defined)) if defined else None,
        "auroc_mean_ci95": interval(mean_boot),
        "auprc_mean": float(np.mean([v for v in fold_auprc if v is not None])) if defined else None,
        "auroc_folds": fold_auroc,
        "auroc_folds_ci95": fold_auroc_ci,
        "auprc_folds": fold_auprc,
        "auprc_folds_ci95": fold_auprc_ci,
        "auroc_pooled": auroc(pooled_labels, pooled_values),
        "auroc_pooled_ci95": interval(rank_auroc(pooled_labels[pooled_draw], pooled_values[pooled_draw])) if resamples else None,
        "auprc_pooled": auprc(pooled_labels, pooled_values),
        "auprc_pooled_ci95": (
            interval(bootstrap_auprc(pooled_labels, pooled_values, pooled_draw))
            if with_auprc_intervals and resamples else None
        ),
        "auroc_per_class": {key: value for key, value in per_class.items() if key != "masses"},
        "auroc_masses": per_class.get("masses"),
        "threshold": threshold_rates(records, results, name, specificity),
        "inner_auroc_folds": inner,
        "inner_auroc_mean": float(np.mean(inner_defined)) if inner_defined else None,
    }


# --------------------------------------------------------------------------- selection


def inner_auroc(records: Sequence[ImageRecord], result: FoldResult, name: str) -> float | None:
    """AUROC on the fold's reference patients: healthy reference views against their abnormal views."""
    labels = np.array([0 if record.healthy else 1 for record in records])
    chosen = (result.roles == "reference") & np.isfinite(result.scores[name])
    return auroc(labels[chosen], result.scores[name][chosen])


def is_vae_score(name: str) -> bool:
    return not name.removeprefix("contra_").startswith("baseline_")


def select_by_inner_validation(
    records: Sequence[ImageRecord], results: Sequence[FoldResult], candidates: Sequence[str]
) -> dict[str, Any]:
    """Pick, in each fold, the VAE score with the best inner AUROC and report its test AUROC.

    Each choice uses only the fold's training folds, so the mean test AUROC of the
    chosen scores estimates how well the selection procedure itself generalises.
    """
    labels = np.array([0 if record.healthy else 1 for record in records])
    chosen_names, test_auroc, inner_values = [], [], []
    for result in results:
        ranked = []
        for name in candidates:
            if not is_vae_score(name):
                continue
            value = inner_auroc(records, result, name)
            if value is not None:
                ranked.append((value, name))
        if not ranked:
            continue
        best_value, best = max(ranked)
        test = (result.roles == "test") & np.isfinite(result.scores[best])
        chosen_names.append(best)
        inner_values.append(best_value)
        test_auroc.append(auroc(labels[test], result.scores[best][test]))
    defined = [value for value in test_auroc if value is not None]
    return {
        "chosen": chosen_names,
        "inner_auroc": inner_values,
        "test_auroc_folds": test_auroc,
        "test_auroc_mean": float(np.mean(defined)) if defined else None,
    }


def resolve_score_names(requested: Sequence[str], available: dict[str, np.ndarray]) -> list[str]:
    """Return the requested score names, or all for ``all``; an unknown name raises ValueError."""
    if list(requested) == ["all"]:
        return sorted(available)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ValueError(f"unknown score names {unknown}; this policy computes {sorted(available)}")
    return list(requested)


def summarize(
    records: Sequence[ImageRecord],
    results: Sequence[FoldResult],
    names: Sequence[str],
    resamples: int,
    seed: int,
    specificity: float,
) -> dict[str, Any]:
    """Build the JSON summary: data counts, folds, metrics of every score and the inner selection."""
    labels = np.array([0 if record.healthy else 1 for record in records])
    folds = []
    for result in results:
        test = result.roles == "test"
        folds.append(
            {
                "fold": result.fold,
                "test_patients": len({records[index].patient_id for index in np.flatnonzero(test)}),
                "test_healthy_views": int((test & (labels == 0)).sum()),
                "test_abnormal_views": int((test & (labels == 1)).sum()),
                "training_views": int((result.roles == "train").sum()),
                "reference_healthy_views": int(((result.roles == "reference") & (labels == 0)).sum()),
                "reference_abnormal_views": int(((result.roles == "reference") & (labels == 1)).sum()),
                "seconds": round(result.seconds, 1),
            }
        )
    many = len(names) > 12
    scores = {
        name: score_metrics(records, results, name, resamples, seed, specificity, with_auprc_intervals=not many)
        for name in names
    }
    return {
        "data": {
            "views": len(records),
            "patients": len({record.patient_id for record in records}),
            "healthy_views": int((labels == 0).sum()),
            "abnormal_views": int((labels == 1).sum()),
        },
        "folds": folds,
        "primary_score": names[0],
        "scores": scores,
        "inner_selection": select_by_inner_validation(records, results, names) if len(names) > 1 else None,
        "bootstrap": {"resamples": resamples, "unit": "view", "seed": seed, "level": LEVEL},
    }


# --------------------------------------------------------------------------- figures


def write_figures(
    out: Path, records: Sequence[ImageRecord], images: np.ndarray, results: Sequence[FoldResult], names: Sequence[str]
) -> None:
    """``roc.png`` with the pooled curves of the first scores, and ``maps-<score>.png`` for the first score."""
    labels = np.array([0 if record.healthy else 1 for record in records])
    curves = []
    for name in names[:MAX_ROC_CURVES]:
        tests = [np.flatnonzero((result.roles == "test") & np.isfinite(result.scores[name])) for result in results]
        values = np.concatenate([standardized(result, name, records)[test] for result, test in zip(results, tests)])
        truth = np.concatenate([labels[test] for test in tests])
        value = auroc(truth, values)
        if value is None:
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(truth, values)
        curves.append(RocCurve(name, false_positive_rate, true_positive_rate, value))
    if curves:
        plot_roc(curves, out / "roc.png", title="cross-validated, pooled over test folds")
    plot_score_maps(out / f"maps-{names[0]}.png", map_rows(records, images, results, names[0]))


def map_rows(
    records: Sequence[ImageRecord], images: np.ndarray, results: Sequence[FoldResult], name: str
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Test views with the highest and lowest scoring abnormal ones and the highest healthy ones."""
    entries = []
    for result in results:
        values = standardized(result, name, records)
        for index in np.flatnonzero(result.roles == "test"):
            features = result.features[index]
            if features is None or not np.isfinite(values[index]):
                continue
            entries.append((float(values[index]), index, features))
    abnormal = sorted((entry for entry in entries if not records[entry[1]].healthy), key=lambda entry: -entry[0])
    healthy = sorted((entry for entry in entries if records[entry[1]].healthy), key=lambda entry: -entry[0])
    chosen = abnormal[:MAP_ROWS_PER_GROUP] + abnormal[-MAP_ROWS_PER_GROUP:] + healthy[:MAP_ROWS_PER_GROUP]
    bare = name.removeprefix("contra_")
    rows = []
    for value, index, features in chosen:
        record = records[index]
        if bare.startswith("residual"):
            score_map = features.residual_map
        elif "kl" in bare:
            score_map = features.kl_map
        else:
            score_map = features.error_map
        title = f"{record.image_id} {', '.join(record.abnormality_classes) or 'normal'}\nz {value:+.2f}"
        rows.append((title, images[index], np.asarray(score_map, dtype=np.float32)))
    return rows


def plot_score_maps(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray]], per_row: int = 4) -> Path | None:
    """Grid of views, each followed by its score map drawn over it."""
    if not rows:
        return None
    lines = -(-len(rows) // per_row)
    figure, axes = plt.subplots(lines, 2 * per_row, figsize=(2.0 * 2 * per_row, 2.3 * lines), squeeze=False)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_frame_on(False)
    for position, (title, image, score_map) in enumerate(rows):
        line, column = divmod(position, per_row)
        view_axis, map_axis = axes[line, 2 * column], axes[line, 2 * column + 1]
        view_axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        view_axis.set_title(title, fontsize="x-small")
        map_axis.imshow(image, cmap="gray", vmin=0, vmax=1, extent=(0, 1, 1, 0))
        # The colour scale spans the map's positive values, so a nearly flat map still shows its peaks.
        positive = score_map[score_map > 0]
        low = float(np.percentile(positive, 5)) if positive.size else 0.0
        high = float(positive.max()) if positive.size else 1.0
        shown = np.ma.masked_less_equal(score_map, 0.0)
        map_axis.imshow(shown, cmap="magma", alpha=0.6, vmin=low, vmax=max(high, low + 1e-12), extent=(0, 1, 1, 0))
        map_axis.set_title("score map", fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path

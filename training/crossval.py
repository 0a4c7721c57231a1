"""Patient-level cross-validation of the VAE's anomaly scores.

For each of ``--folds`` folds (both films of a woman always in one fold), the VAE is
trained on the healthy views of an inner training part of the other folds. The
patients held out of that inner part are the reference. Their healthy views calibrate
the scores and fix the threshold for 95% specificity. Together with their abnormal
views they form the inner validation, which compares scores without the test fold.
Every view of the test fold is then scored.

Usage::

    python -m training.crossval --data-format mini-mias --data data/mini-mias --folds 5 --seed 7

Prints one JSON line with the metrics of every requested score and writes to
``--out``: ``result.json``, ``scores.csv`` (one row per view and fold), ``roc.png``
and ``maps-<score>.png`` (test views with their score maps).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, TensorDataset

from model.scoring import RESOLUTION_POLICIES, ScoreSettings, breast_mask, extract_patches
from model.vae import PRESETS, VAE, VAEConfig, preset
from training import crossval_metrics as metrics
from training.cache import CachedImages, load_or_build_cache
from training.cli import add_data_arguments, add_patch_arguments, check_threads, configure_logging, records_from_arguments
from training.data import ImageRecord, make_split
from training.loop import epoch_seed, train_epoch
from training.patches import DEFAULT_PATCHES_PER_VIEW, candidate_positions, sample_positions
from training.scores import (
    ScoreReference,
    ViewFeatures,
    contralateral,
    contralateral_map_scores,
    patch_features,
    whole_features,
)

logger = logging.getLogger(__name__)

# The defaults are the adopted configuration; docs/detection.md compares it with the others.
DEFAULT_SCORES = ("contra_kl_mean", "kl_mean", "contra_residual_p99", "residual_p99", "global_mse")
DEFAULT_PRESET = "tiny"
DEFAULT_LATENT_SIZE = 128
DEFAULT_EPOCHS = 6
DEFAULT_BATCH_SIZE = 32
DEFAULT_POLICY = "patches"
# Share of the training folds' patients held out of training as the healthy
# reference and the inner validation.
DEFAULT_REFERENCE_FRACTION = 0.25
# Cross-fitting groups for the reference views' own scores.
REFERENCE_GROUPS = 5
# Training views scored to fit the Gaussian of healthy latent means; scoring all of
# them costs time in patch mode and changes the fit little.
MAX_TRAINING_VIEWS_SCORED = 48


# --------------------------------------------------------------------------- folds


def patient_folds(records: Sequence[ImageRecord], folds: int, seed: int) -> np.ndarray:
    """Fold number of every record: whole patients, stratified by healthy or abnormal view.

    Uses scikit-learn's StratifiedGroupKFold with the patient as the group, so the two
    films of a woman always share a fold.
    """
    patients = [record.patient_id for record in records]
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if len(set(patients)) < folds:
        raise ValueError(f"{len(set(patients))} patients cannot fill {folds} folds; use fewer folds")
    labels = np.array([0 if record.healthy else 1 for record in records])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(records), -1, dtype=np.int64)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(records)), labels, groups=patients)):
        assignment[test] = fold
    return assignment


def inner_roles(
    records: Sequence[ImageRecord], fold_of: np.ndarray, fold: int, fraction: float, seed: int
) -> np.ndarray:
    """Role of every record in one fold: train, reference, test or unused.

    The training folds' patients are split at patient level with
    ``training.data.make_split``: the healthy views of the inner training patients
    train the VAE (``train``), every view of the held-out patients is ``reference``
    (healthy ones calibrate, abnormal ones join the inner validation), and the inner
    training patients' abnormal views are ``unused``.
    """
    roles = np.full(len(records), "unused", dtype=object)
    roles[fold_of == fold] = "test"
    outer = [index for index in range(len(records)) if fold_of[index] != fold]
    outer_records = [records[index] for index in outer]
    split = make_split(
        outer_records, seed, {"train": 1.0 - fraction, "validation": fraction, "test": 0.0}
    )
    held_out = set(split.validation)
    for index in outer:
        record = records[index]
        if record.patient_id in held_out:
            roles[index] = "reference"
        elif record.healthy:
            roles[index] = "train"
    return roles


def partner_indices(records: Sequence[ImageRecord]) -> np.ndarray:
    """Index of the same view of the other breast of the same patient, or -1.

    A partner has the same patient and view position and the other laterality; with
    several candidates the first one in record order is taken.
    """
    by_key: dict[tuple[str, str | None, str | None], int] = {}
    for index, record in enumerate(records):
        by_key.setdefault((record.patient_id, record.view_position, record.laterality), index)
    opposite = {"L": "R", "R": "L"}
    result = np.full(len(records), -1, dtype=np.int64)
    for index, record in enumerate(records):
        other = opposite.get(record.laterality or "")
        if other is not None:
            result[index] = by_key.get((record.patient_id, record.view_position, other), -1)
    return result


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 1e-3
    augment: bool = False
    patches_per_view: int = DEFAULT_PATCHES_PER_VIEW


def augment_batch(images: np.ndarray, rng: np.random.Generator, patches: bool) -> np.ndarray:
    """Random top-bottom flips (and left-right flips for patches) and a gamma in [0.8, 1.25].

    Whole views keep the chest wall on the left, so only patches are mirrored left-right.
    """
    images = images.copy()
    flip_rows = rng.random(len(images)) < 0.5
    images[flip_rows] = images[flip_rows, ::-1, :]
    if patches:
        flip_columns = rng.random(len(images)) < 0.5
        images[flip_columns] = images[flip_columns, :, ::-1]
    gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25), size=len(images))).astype(np.float32)
    return np.power(np.clip(images, 0.0, 1.0), gamma[:, None, None])


class PatchSampler:
    """Draws random breast patches of the training views, new ones every epoch."""

    def __init__(self, images: np.ndarray, patch: ScoreSettings) -> None:
        self.images = images
        self.patch = patch
        self.candidates = [
            candidate_positions(breast_mask(image), patch.patch_size, patch.min_coverage) for image in images
        ]

    def draw(self, per_view: int, rng: np.random.Generator) -> np.ndarray:
        chunks = []
        for image, candidates in zip(self.images, self.candidates):
            positions = sample_positions(candidates, per_view, rng)
            chunks.append(extract_patches(image, positions, self.patch.patch_size))
        return np.concatenate(chunks)


def train_vae(
    config: VAEConfig,
    images: np.ndarray,
    settings: TrainingSettings,
    seed: int,
    patch: ScoreSettings | None,
) -> VAE:
    """Train a VAE on whole views ``(N, H, W)``, or on random patches of them when ``patch`` is set."""
    torch.manual_seed(seed)
    model = VAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    rng = np.random.default_rng(seed)
    sampler = PatchSampler(images, patch) if patch is not None else None
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        data = sampler.draw(settings.patches_per_view, rng) if sampler is not None else images
        if settings.augment:
            data = augment_batch(data, rng, patches=sampler is not None)
        tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).unsqueeze(1)
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
        loader = DataLoader(TensorDataset(tensor), batch_size=settings.batch_size, shuffle=True, generator=generator)
        torch.manual_seed(epoch_seed(seed, epoch, 0))
        totals = train_epoch(model, loader, optimizer)
        means = totals.means()
        logger.debug(
            "epoch %d/%d: loss %.2f (reconstruction %.2f, KL %.2f) on %d inputs in %.1f s",
            epoch, settings.epochs, means["loss"], means["reconstruction"], means["kl"], len(data),
            time.perf_counter() - started,
        )
    logger.info("trained %d epochs, last loss %.2f", settings.epochs, means["loss"])
    model.eval()
    return model


# --------------------------------------------------------------------------- one fold


@dataclass
class FoldResult:
    fold: int
    roles: np.ndarray  # role of every record
    scores: dict[str, np.ndarray]  # name -> score of every record (NaN where not scored)
    features: list[ViewFeatures | None]
    seconds: float


def views_to_score(roles: np.ndarray, seed: int) -> np.ndarray:
    """Test and reference views, plus up to MAX_TRAINING_VIEWS_SCORED training views for the latent Gaussian."""
    train = np.flatnonzero(roles == "train")
    if len(train) > MAX_TRAINING_VIEWS_SCORED:
        train = np.random.default_rng(seed).choice(train, size=MAX_TRAINING_VIEWS_SCORED, replace=False)
    return np.sort(np.concatenate([np.flatnonzero((roles == "test") | (roles == "reference")), train]))


def view_features(model: VAE, images: np.ndarray, patch: ScoreSettings | None) -> list[ViewFeatures]:
    return patch_features(model, images, patch) if patch is not None else whole_features(model, images)


def score_table(
    features: Sequence[ViewFeatures], references: Sequence[ScoreReference], tissues: Sequence[str | None]
) -> dict[str, np.ndarray]:
    """Scores of each view with its own reference, as arrays by score name."""
    rows = [reference.scores(view, tissue) for view, reference, tissue in zip(features, references, tissues)]
    names = sorted(rows[0])
    return {name: np.array([row.get(name, np.nan) for row in rows], dtype=np.float64) for name in names}


def fit_references(
    features: Sequence[ViewFeatures],
    records: Sequence[ImageRecord],
    roles: np.ndarray,
    seed: int,
) -> list[ScoreReference]:
    """Fit the reference each view is scored against.

    Healthy reference views are scored against a reference fitted without their own
    patient's group (cross-fitting), so their scores are as unbiased as the test
    views'. Every other view uses the reference fitted on all healthy reference views.
    """
    train = [index for index in range(len(records)) if roles[index] == "train" and features[index] is not None]
    healthy_reference = [index for index in range(len(records)) if roles[index] == "reference" and records[index].healthy]
    if not healthy_reference:
        raise ValueError("this fold has no healthy reference view; raise --reference-fraction or add data")
    training_latents = np.stack([features[index].latent for index in train])
    patch_latents = None
    if features[train[0]].patch_latent is not None:
        rng = np.random.default_rng(seed)
        stacked = np.concatenate([features[index].patch_latent for index in train])
        patch_latents = stacked[rng.choice(len(stacked), size=min(len(stacked), 4000), replace=False)]

    def fit(indices: Sequence[int]) -> ScoreReference:
        return ScoreReference.fit(
            [features[index] for index in indices],
            [records[index].tissue for index in indices],
            training_latents,
            patch_latents,
        )

    full = fit(healthy_reference)
    references = [full] * len(records)
    patients = sorted({records[index].patient_id for index in healthy_reference})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    group_of = {patients[position]: rank % REFERENCE_GROUPS for rank, position in enumerate(order)}
    for group in range(min(REFERENCE_GROUPS, len(patients))):
        members = [index for index in healthy_reference if group_of[records[index].patient_id] == group]
        rest = [index for index in healthy_reference if group_of[records[index].patient_id] != group]
        if not members or len(rest) < 2:
            continue
        partial = fit(rest)
        for index in members:
            references[index] = partial
    return references


def run_fold(
    fold: int,
    records: Sequence[ImageRecord],
    images: np.ndarray,
    fold_of: np.ndarray,
    args: argparse.Namespace,
    config: VAEConfig,
    partners: np.ndarray,
) -> FoldResult:
    started = time.perf_counter()
    seed = args.seed * 100 + fold
    roles = inner_roles(records, fold_of, fold, args.reference_fraction, seed)
    train = np.flatnonzero(roles == "train")
    patch = patch_settings(args)
    logger.info(
        "fold %d: training on %d healthy views, %d reference views, %d test views",
        fold, len(train), int((roles == "reference").sum()), int((roles == "test").sum()),
    )
    model = train_vae(config, images[train], training_settings(args), seed, patch)

    scored = views_to_score(roles, seed)
    features: list[ViewFeatures | None] = [None] * len(records)
    for index, view in zip(scored, view_features(model, images[scored], patch)):
        features[index] = view
    scored_features = [features[index] for index in scored]
    references = fit_references(features, records, roles, seed)
    table = score_table(
        scored_features, [references[index] for index in scored], [records[index].tissue for index in scored]
    )
    scores = {name: np.full(len(records), np.nan) for name in table}
    for name, values in table.items():
        scores[name][scored] = values
    scores.update(contralateral(scores, partners))
    scores.update(pair_scores(features, partners, scored))
    seconds = time.perf_counter() - started
    logger.info("fold %d done in %.0f s", fold, seconds)
    return FoldResult(fold, roles, scores, features, seconds)


def pair_scores(
    features: Sequence[ViewFeatures | None], partners: np.ndarray, scored: np.ndarray
) -> dict[str, np.ndarray]:
    """Map-level contralateral scores of every scored view whose partner was scored too."""
    table: dict[str, np.ndarray] = {}
    for index in scored:
        partner = partners[index]
        if partner < 0 or features[partner] is None:
            continue
        for name, value in contralateral_map_scores(features[index], features[partner]).items():
            table.setdefault(name, np.full(len(features), np.nan))[index] = value
    return table


# --------------------------------------------------------------------------- outputs


def write_scores_csv(
    path: Path, records: Sequence[ImageRecord], results: Sequence[FoldResult], names: Sequence[str]
) -> None:
    """Write one row per view and fold in which it was scored, with its role there."""
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["fold", "role", "image_id", "patient_id", "label", "classes", "tissue", *names])
        for result in results:
            for index, record in enumerate(records):
                if result.roles[index] not in ("test", "reference"):
                    continue
                writer.writerow(
                    [
                        result.fold,
                        result.roles[index],
                        record.image_id,
                        record.patient_id,
                        record.label,
                        ";".join(record.abnormality_classes),
                        record.tissue or "",
                        *(f"{result.scores[name][index]:.6g}" for name in names),
                    ]
                )


# --------------------------------------------------------------------------- CLI


def patch_settings(args: argparse.Namespace) -> ScoreSettings | None:
    if args.resolution_policy != "patches":
        return None
    return ScoreSettings(
        resolution_policy="patches",
        patch_resolution=args.patch_resolution,
        patch_size=args.patch_size,
        patch_stride=args.patch_stride or args.patch_size // 2,
        min_coverage=args.min_coverage,
    )


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    return TrainingSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        patches_per_view=args.patches_per_view,
    )


def model_config(args: argparse.Namespace) -> VAEConfig:
    overrides: dict[str, Any] = {}
    if args.latent_size is not None:
        overrides["latent_size"] = args.latent_size
    if args.beta is not None:
        overrides["beta"] = args.beta
    if args.reconstruction_loss is not None:
        overrides["reconstruction_loss"] = args.reconstruction_loss
    if args.resolution_policy == "patches":
        overrides["input_size"] = args.patch_size
    return preset(args.preset, **overrides)


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/crossval"), help="output folder (default runs/crossval)")
    parser.add_argument("--folds", type=int, default=5, help="patient-level folds (default 5)")
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the folds, inner splits, weights and bootstrap (default 7)"
    )
    parser.add_argument(
        "--max-views", type=int, default=None,
        help="use only the first N views in record order, for quick checks (default: all)",
    )
    parser.add_argument(
        "--score", nargs="+", default=list(DEFAULT_SCORES),
        help="score names to report ('all' for every score computed); the first is the one plotted "
        f"(default: {' '.join(DEFAULT_SCORES)})",
    )
    parser.add_argument(
        "--reference-fraction", type=float, default=DEFAULT_REFERENCE_FRACTION,
        help="share of the training folds' patients held out as healthy reference and inner validation "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples over views for the intervals (default 1000)"
    )
    parser.add_argument(
        "--specificity", type=float, default=0.95, help="target specificity of the calibrated threshold (default 0.95)"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help=f"model.vae preset (default {DEFAULT_PRESET})"
    )
    parser.add_argument(
        "--latent-size", type=int, default=DEFAULT_LATENT_SIZE,
        help=f"latent size, overriding the preset's (default {DEFAULT_LATENT_SIZE})",
    )
    parser.add_argument("--beta", type=float, default=None, help="weight of the KL term (default: the preset's)")
    parser.add_argument(
        "--reconstruction-loss", choices=("bce", "mse"), default=None,
        help="reconstruction term summed over pixels (default: the preset's)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs per fold (default {DEFAULT_EPOCHS})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"inputs (views or patches) per optimisation step (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    parser.add_argument("--augment", action="store_true", help="random flips and gamma during training")


def add_resolution_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resolution-policy", choices=RESOLUTION_POLICIES, default=DEFAULT_POLICY,
        help="'whole': the breast at the VAE's input size; 'patches': VAE patches of the breast at "
        f"--patch-resolution (default {DEFAULT_POLICY})",
    )
    add_patch_arguments(parser)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.crossval",
        description="Cross-validate anomaly scores with patient-level folds and print the metrics as one JSON line.",
    )
    add_data_arguments(parser)
    # One thread by default: results then repeat exactly, whatever the machine's core count.
    parser.set_defaults(threads=1)
    for action in parser._actions:
        if action.dest == "threads":
            action.help = "PyTorch threads and preprocessing processes (default 1, so that results repeat exactly)"
    add_protocol_arguments(parser)
    add_model_arguments(parser)
    add_resolution_arguments(parser)

    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "patches_per_view"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.reference_fraction < 1.0:
        parser.error(f"--reference-fraction must lie strictly between 0 and 1, got {args.reference_fraction}")
    if args.resolution_policy == "patches" and args.patch_size > args.patch_resolution:
        parser.error(f"--patch-size {args.patch_size} exceeds --patch-resolution {args.patch_resolution}")
    return args


def load_images(args: argparse.Namespace, records: list[ImageRecord], size: int) -> tuple[list[ImageRecord], np.ndarray]:
    """Preprocessed views of the records (from the cache), dropping those preprocessing rejected."""
    cache_dir = args.cache_dir or args.out / "cache"
    cache: CachedImages = load_or_build_cache(records, cache_dir, size=size, threads=args.threads)
    images, kept = cache.select(range(len(records)))
    if cache.failures:
        logger.warning("%d views rejected by preprocessing are left out", len(cache.failures))
    return [records[index] for index in kept], images


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    threads = check_threads(args.threads)
    torch.set_num_threads(threads)
    started = time.perf_counter()

    records = records_from_arguments(args)
    if args.max_views is not None:
        records = records[: args.max_views]
    config = model_config(args)
    size = args.patch_resolution if args.resolution_policy == "patches" else config.input_size
    records, images = load_images(args, records, size)
    fold_of = patient_folds(records, args.folds, args.seed)
    partners = partner_indices(records)

    results = [run_fold(fold, records, images, fold_of, args, config, partners) for fold in range(args.folds)]
    names = metrics.resolve_score_names(args.score, results[0].scores)
    summary = metrics.summarize(records, results, names, args.bootstrap, args.seed, args.specificity)
    scoring = patch_settings(args) or ScoreSettings(resolution_policy="whole")
    summary["config"] = {**vars(args), "model_config": config.to_dict(), "scoring": scoring.to_dict()}
    summary["seconds"] = round(time.perf_counter() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    write_scores_csv(args.out / "scores.csv", records, results, names)
    metrics.write_figures(args.out, records, images, results, names)
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

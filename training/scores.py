"""Anomaly scores of views compared by cross-validation.

Scoring runs in two stages. :func:`whole_features` and :func:`patch_features` run the
VAE over views and keep, per view, the values that need no healthy reference (errors,
residual maxima, KL) plus the per-patch arrays that later scores summarise.
:class:`ScoreReference` is then fitted on healthy views held out of training and turns
those features into every named score: errors normalised by density or tissue, patch
errors normalised per location or per intensity, and latent distances.
Contralateral scores (``contra_<name>``) subtract the score of the same view of the
other breast; :func:`contralateral` computes them from a table of scores.

Scores named ``baseline_*`` use the pixels alone, never the VAE, and are reported only
as baselines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from sklearn.covariance import LedoitWolf

from model.scoring import (
    SCORES,
    ScoreSettings,
    ViewMaps,
    extract_patches,
    kl_divergence,
    residual_sigma,
    view_maps,
)
from model.vae import VAE
from training.patches import patch_value_map, top_k_mean

logger = logging.getLogger(__name__)

# Bright-blob baseline: difference of Gaussians at these scales (pixels of a 128-pixel view).
BLOB_SIGMAS_128 = (1.5, 6.0)
TOP_K = 3
PATCH_QUANTILE = 0.95
# Grid cells need this many healthy reference patches for their own statistics.
MIN_CELL_COUNT = 5
SCORE_BATCH = 64
# Maps kept per view for figures, in pixels a side.
MAP_SIZE = 128
CONTRA_PREFIX = "contra_"

# Scores that are normalised against healthy views of similar density.
DENSITY_BASES = ("global_mse", "breast_mse", "residual_max", "residual_p99", "patch_mean", "patch_top3")


@dataclass
class ViewFeatures:
    """Reference-free values of one view and the per-patch arrays later scores need."""

    values: dict[str, float]
    latent: np.ndarray  # posterior mean (L,), or the mean over patches in patch mode
    error_map: np.ndarray  # squared error, float16 (MAP_SIZE, MAP_SIZE)
    residual_map: np.ndarray  # smoothed positive residual, float16 (MAP_SIZE, MAP_SIZE)
    kl_map: np.ndarray  # KL divergence of each patch spread over its pixels, float16 (MAP_SIZE, MAP_SIZE)
    mask_map: np.ndarray  # breast mask, bool (MAP_SIZE, MAP_SIZE)
    view_map: np.ndarray  # the view itself, float16 (MAP_SIZE, MAP_SIZE), for the pixel baseline
    patch_error: np.ndarray | None = None  # (K,) mean squared error over the breast pixels of each patch
    patch_intensity: np.ndarray | None = None  # (K,) mean intensity of those pixels
    patch_cell: np.ndarray | None = None  # (K,) grid cell of each patch
    patch_latent: np.ndarray | None = None  # (K, L) posterior means
    patch_positions: np.ndarray | None = None  # (K, 2) top-left corners in view pixels
    view_size: int = 0


@torch.no_grad()
def run_model(model: VAE, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reconstructions ``(N, H, W)``, posterior means and KL of ``(N, H, W)`` images, batched."""
    model.eval()
    reconstructions, means, kls = [], [], []
    for start in range(0, len(images), SCORE_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + SCORE_BATCH], dtype=np.float32))
        mu, logvar = model.encode(batch.unsqueeze(1))
        reconstructions.append(model.decode(mu)[:, 0].numpy())
        means.append(mu.numpy())
        kls.append(kl_divergence(mu.numpy(), logvar.numpy()))
    return np.concatenate(reconstructions), np.concatenate(means), np.concatenate(kls)


def reduce_map(values: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """Block-average a square map to ``size`` pixels a side (NaN counts as 0) as float16."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    factor = max(1, values.shape[0] // size)
    if factor > 1:
        values = values.reshape(size, factor, size, factor).mean(axis=(1, 3))
    return values.astype(np.float16)


def reduce_mask(mask: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """Block-reduce a square mask to ``size`` pixels a side: True where most of the block is breast."""
    return reduce_map(mask.astype(np.float32), size).astype(np.float32) >= 0.5


def baseline_values(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pixel statistics without the VAE: breast density, bright tail and brightest blob."""
    scale = image.shape[0] / 128.0
    inside = image[mask] if mask.any() else image.ravel()
    fine, coarse = (sigma * scale for sigma in BLOB_SIGMAS_128)
    blob = ndimage.gaussian_filter(image, fine) - ndimage.gaussian_filter(image, coarse)
    return {
        "baseline_density": float(inside.mean()),
        "baseline_p99": float(np.percentile(inside, 99)),
        "baseline_blob": float(blob[mask].max()) if mask.any() else float(blob.max()),
    }


class RecordingRun:
    """Model-run callable for ``model.scoring.view_maps`` that keeps the outputs of its last call."""

    def __init__(self, model: VAE) -> None:
        self.model = model
        self.reconstructions = np.empty((0, model.config.input_size, model.config.input_size), dtype=np.float32)
        self.means = np.empty((0, model.config.latent_size), dtype=np.float32)
        self.kls = np.empty(0, dtype=np.float32)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.reconstructions, self.means, self.kls = run_model(self.model, batch)
        return self.reconstructions, self.kls


def registered_values(maps: ViewMaps) -> dict[str, float]:
    """Compute the per-view scores of ``model.scoring.SCORES`` with the functions the worker uses."""
    return {name: definition.summarize(maps)[0] for name, definition in SCORES.items() if not definition.pairwise}


def whole_features(model: VAE, images: np.ndarray) -> list[ViewFeatures]:
    """Features of whole views ``(N, H, W)`` at the VAE's input size."""
    settings = ScoreSettings(resolution_policy="whole")
    recorder = RecordingRun(model)
    features = []
    for image in images:
        maps = view_maps(recorder, image, settings)
        values = {**registered_values(maps), **baseline_values(image, maps.mask)}
        features.append(
            ViewFeatures(
                values=values,
                latent=recorder.means[0].astype(np.float32),
                error_map=reduce_map(maps.squared_error),
                residual_map=reduce_map(np.where(maps.mask, maps.residual, 0.0)),
                kl_map=reduce_map(np.where(maps.mask, maps.kl_map, 0.0)),
                mask_map=reduce_mask(maps.mask),
                view_map=reduce_map(image),
                view_size=image.shape[0],
            )
        )
    return features


def patch_features(model: VAE, images: np.ndarray, settings: ScoreSettings) -> list[ViewFeatures]:
    """Features of views ``(N, S, S)`` scored as a grid of patches of the VAE's input size."""
    if model.config.input_size != settings.patch_size:
        raise ValueError(
            f"patch size {settings.patch_size} differs from the VAE input size {model.config.input_size}"
        )
    return [single_patch_features(model, image, settings) for image in images]


def single_patch_features(model: VAE, image: np.ndarray, settings: ScoreSettings) -> ViewFeatures:
    recorder = RecordingRun(model)
    maps = view_maps(recorder, image, settings)

    size = settings.patch_size
    positions = maps.patch_positions
    patches = extract_patches(image, positions, size)
    patch_masks = extract_patches(maps.mask.astype(np.float32), positions, size) > 0.5
    squared = (recorder.reconstructions - patches) ** 2
    breast_pixels = np.maximum(patch_masks.sum(axis=(1, 2)), 1)
    patch_error = (squared * patch_masks).sum(axis=(1, 2)) / breast_pixels
    patch_intensity = (patches * patch_masks).sum(axis=(1, 2)) / breast_pixels

    columns = (image.shape[1] - size) // settings.patch_stride + 2
    cells = (positions[:, 0] // settings.patch_stride) * columns + positions[:, 1] // settings.patch_stride
    kls = recorder.kls

    values = {
        **registered_values(maps),
        "patch_mean": float(patch_error.mean()),
        "patch_top3": top_k_mean(patch_error, TOP_K),
        "patch_max": float(patch_error.max()),
        "patch_kl_top3": top_k_mean(kls, TOP_K),
        **baseline_values(image, maps.mask),
    }
    return ViewFeatures(
        values=values,
        latent=recorder.means.mean(axis=0).astype(np.float32),
        error_map=reduce_map(patch_value_map(patch_error, positions, image.shape, size)),
        residual_map=reduce_map(np.where(maps.mask, maps.residual, 0.0)),
        kl_map=reduce_map(np.where(maps.mask, maps.kl_map, 0.0)),
        mask_map=reduce_mask(maps.mask),
        view_map=reduce_map(image),
        patch_error=patch_error.astype(np.float32),
        patch_intensity=patch_intensity.astype(np.float32),
        patch_cell=cells.astype(np.int64),
        patch_latent=recorder.means.astype(np.float32),
        patch_positions=positions,
        view_size=image.shape[0],
    )


# --------------------------------------------------------------------------- reference


@dataclass
class LinearFit:
    """Least-squares polynomial of a value on a covariate, with the residual spread."""

    coefficients: np.ndarray
    residual_std: float

    @classmethod
    def fit(cls, covariate: np.ndarray, value: np.ndarray, degree: int = 1) -> LinearFit:
        covariate = np.asarray(covariate, dtype=np.float64)
        value = np.asarray(value, dtype=np.float64)
        degree = min(degree, max(0, len(np.unique(covariate)) - 1))
        coefficients = np.polyfit(covariate, value, degree) if len(value) > degree else np.array([value.mean()])
        residual = value - np.polyval(coefficients, covariate)
        spread = float(residual.std(ddof=1)) if len(value) > 2 else 0.0
        return cls(coefficients, spread if spread > 0 else 1.0)

    def standardize(self, covariate: np.ndarray, value: np.ndarray) -> np.ndarray:
        return (np.asarray(value, dtype=np.float64) - np.polyval(self.coefficients, covariate)) / self.residual_std


@dataclass
class ScoreReference:
    """Statistics of healthy views that normalised and latent-distance scores compare against.

    ``fit`` takes the healthy reference views (held out of training) and the
    training views' latent means.
    """

    density_fits: dict[str, LinearFit] = field(default_factory=dict)
    tissue_stats: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    latent_mean: np.ndarray | None = None
    latent_precision: np.ndarray | None = None
    patch_latent_mean: np.ndarray | None = None
    patch_latent_precision: np.ndarray | None = None
    patch_threshold: float | None = None
    cell_stats: dict[int, tuple[float, float]] = field(default_factory=dict)
    overall_patch_stats: tuple[float, float] = (0.0, 1.0)
    intensity_fit: LinearFit | None = None

    @classmethod
    def fit(
        cls,
        reference: Sequence[ViewFeatures],
        tissues: Sequence[str | None],
        training_latents: np.ndarray,
        training_patch_latents: np.ndarray | None = None,
    ) -> ScoreReference:
        if not reference:
            raise ValueError("cannot fit a score reference on zero healthy views")
        result = cls()
        density = np.array([view.values["baseline_density"] for view in reference])
        for name in DENSITY_BASES:
            if name in reference[0].values:
                values = np.array([view.values[name] for view in reference])
                result.density_fits[name] = LinearFit.fit(density, values)
                result.tissue_stats[name] = tissue_statistics(values, tissues)
        result.latent_mean, result.latent_precision = gaussian_fit(training_latents)
        if reference[0].patch_error is not None:
            errors = np.concatenate([view.patch_error for view in reference])
            intensities = np.concatenate([view.patch_intensity for view in reference])
            cells = np.concatenate([view.patch_cell for view in reference])
            result.patch_threshold = float(np.quantile(errors, PATCH_QUANTILE))
            result.overall_patch_stats = (float(errors.mean()), float(errors.std()) or 1.0)
            for cell in np.unique(cells):
                chosen = errors[cells == cell]
                if chosen.size >= MIN_CELL_COUNT and chosen.std() > 0:
                    result.cell_stats[int(cell)] = (float(chosen.mean()), float(chosen.std()))
            result.intensity_fit = LinearFit.fit(intensities, errors, degree=2)
            if training_patch_latents is not None:
                result.patch_latent_mean, result.patch_latent_precision = gaussian_fit(training_patch_latents)
        return result

    def scores(self, view: ViewFeatures, tissue: str | None) -> dict[str, float]:
        """Compute every score of one view: its reference-free values plus the normalised ones."""
        result = dict(view.values)
        density = view.values["baseline_density"]
        for name, fit in self.density_fits.items():
            result[f"{name}_density"] = float(fit.standardize(np.array([density]), np.array([view.values[name]]))[0])
            mean, std = self.tissue_stats[name].get(tissue or "", self.tissue_stats[name]["all"])
            result[f"{name}_tissue"] = (view.values[name] - mean) / std
        if self.latent_mean is not None:
            result["latent_mahalanobis"] = mahalanobis(view.latent[None], self.latent_mean, self.latent_precision)[0]
        if view.patch_error is not None:
            result.update(self.patch_scores(view))
        return result

    def patch_scores(self, view: ViewFeatures) -> dict[str, float]:
        errors = view.patch_error.astype(np.float64)
        result = {"patch_fraction_q95": float((errors > self.patch_threshold).mean())}
        overall_mean, overall_std = self.overall_patch_stats
        location = np.array(
            [
                (error - self.cell_stats.get(int(cell), (overall_mean, overall_std))[0])
                / self.cell_stats.get(int(cell), (overall_mean, overall_std))[1]
                for error, cell in zip(errors, view.patch_cell)
            ]
        )
        intensity = self.intensity_fit.standardize(view.patch_intensity, errors)
        for prefix, values in (("patch_location_z", location), ("patch_intensity_z", intensity)):
            result[f"{prefix}_mean"] = float(values.mean())
            result[f"{prefix}_top3"] = top_k_mean(values, TOP_K)
            result[f"{prefix}_max"] = float(values.max())
        if self.patch_latent_mean is not None:
            distances = mahalanobis(view.patch_latent, self.patch_latent_mean, self.patch_latent_precision)
            result["patch_latent_mahalanobis_mean"] = float(distances.mean())
            result["patch_latent_mahalanobis_top3"] = top_k_mean(distances, TOP_K)
        return result


def tissue_statistics(values: np.ndarray, tissues: Sequence[str | None]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of ``values`` per tissue class, and over all as ``"all"``."""
    spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    stats = {"all": (float(values.mean()), spread or 1.0)}
    labels = np.array([tissue or "" for tissue in tissues])
    for tissue in np.unique(labels):
        chosen = values[labels == tissue]
        if tissue and chosen.size >= 3 and chosen.std(ddof=1) > 0:
            stats[str(tissue)] = (float(chosen.mean()), float(chosen.std(ddof=1)))
    return stats


def gaussian_fit(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrunk precision matrix of latent vectors ``(N, L)``."""
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 2 or len(latents) < 2:
        raise ValueError(f"need at least two latent vectors (N, L) to fit a Gaussian, got shape {latents.shape}")
    estimator = LedoitWolf().fit(latents)
    return estimator.location_, estimator.precision_


def mahalanobis(latents: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``latents`` to a Gaussian."""
    centred = np.asarray(latents, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision, centred), 0.0))


def contralateral_map_scores(view: ViewFeatures, partner: ViewFeatures) -> dict[str, float]:
    """Scores of the difference between a view's maps and those of the other breast.

    Both views are oriented with the chest wall on the left and resized to their own
    breast's bounding box, so the same map pixel shows about the same place in both
    breasts. The difference is smoothed over a lesion's size before its maximum and
    99th percentile inside this view's breast are taken.
    """
    result = {}
    sigma = 2.0 * residual_sigma(MAP_SIZE)
    mask = view.mask_map if view.mask_map.any() else np.ones(view.mask_map.shape, dtype=bool)
    for name, own, other in (
        ("map_error", view.error_map, partner.error_map),
        ("map_residual", view.residual_map, partner.residual_map),
        ("baseline_map", view.view_map, partner.view_map),
    ):
        difference = ndimage.gaussian_filter(own.astype(np.float32) - other.astype(np.float32), sigma)
        result[f"{CONTRA_PREFIX}{name}_max"] = float(difference[mask].max())
        result[f"{CONTRA_PREFIX}{name}_p99"] = float(np.percentile(difference[mask], 99))
    if view.patch_error is not None and partner.patch_error is not None:
        other_error = dict(zip(partner.patch_cell.tolist(), partner.patch_error.tolist()))
        differences = [
            error - other_error[cell]
            for cell, error in zip(view.patch_cell.tolist(), view.patch_error.tolist())
            if cell in other_error
        ]
        if differences:
            result[f"{CONTRA_PREFIX}cell_max"] = float(max(differences))
            result[f"{CONTRA_PREFIX}cell_top3"] = top_k_mean(np.array(differences), TOP_K)
    return result


def contralateral(table: dict[str, np.ndarray], partner: np.ndarray) -> dict[str, np.ndarray]:
    """Compute ``contra_<name>``, each view's score minus its partner's; NaN where the partner is -1."""
    has_partner = partner >= 0
    safe = np.where(has_partner, partner, 0)
    return {
        f"{CONTRA_PREFIX}{name}": np.where(has_partner, values - values[safe], np.nan)
        for name, values in table.items()
        if not name.startswith(CONTRA_PREFIX)
    }




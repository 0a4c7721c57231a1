"""Patches of the breast for training and for patch-map summaries.

Views come from ``model.preprocess`` at a higher resolution than the VAE's input
(512 or 1024 pixels a side), so a 128x128 patch shows a lesion at several times the
scale of the whole-breast 128x128 view. Positions are top-left corners ``(row, column)``
in the view's pixels. The mask, the scoring grid and map assembly live in
``model.scoring``, which the worker scores with.
"""

from __future__ import annotations

import numpy as np

from model.scoring import assemble_map, coverage_map

# Random training patches drawn per view and epoch.
DEFAULT_PATCHES_PER_VIEW = 8

# A patch is trained on when at least this share of its pixels is breast.
DEFAULT_MIN_COVERAGE = 0.5
# Random training patches start on this grid (pixels); finer steps add nothing but time.
SAMPLING_STEP = 8


def candidate_positions(
    mask: np.ndarray, patch_size: int, min_coverage: float = DEFAULT_MIN_COVERAGE, step: int = SAMPLING_STEP
) -> np.ndarray:
    """Positions on a ``step``-pixel lattice whose patch is at least ``min_coverage`` breast."""
    coverage = coverage_map(mask, patch_size)[::step, ::step]
    rows, columns = np.nonzero(coverage >= min_coverage)
    if rows.size == 0:
        row, column = np.unravel_index(int(np.argmax(coverage)), coverage.shape)
        rows, columns = np.array([row]), np.array([column])
    return np.stack([rows * step, columns * step], axis=1).astype(np.int64)


def sample_positions(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` positions drawn uniformly from ``candidates``, with replacement only when too few."""
    replace = len(candidates) < count
    chosen = rng.choice(len(candidates), size=count, replace=replace)
    return candidates[chosen]


def patch_value_map(values: np.ndarray, positions: np.ndarray, shape: tuple[int, int], patch_size: int) -> np.ndarray:
    """Spread one value per patch over its pixels and average overlaps; NaN outside all patches."""
    filled = np.broadcast_to(np.asarray(values, dtype=np.float32)[:, None, None], (len(values), patch_size, patch_size))
    return assemble_map(filled, positions, shape)


def top_k_mean(values: np.ndarray, k: int) -> float:
    """Mean of the ``k`` largest values (all of them when there are fewer)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("top_k_mean of zero values")
    k = max(1, min(k, values.size))
    return float(np.partition(values, values.size - k)[values.size - k :].mean())

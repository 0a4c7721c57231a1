"""Figures written by the training commands (matplotlib with the Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def plot_loss(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Plot training and validation loss per epoch, with the KL term on a second axis."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, kl_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_axis.plot(epochs, [row["validation_loss"] for row in history], label="validation")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("negative ELBO per image")
    loss_axis.legend()
    kl_axis.plot(epochs, [row["train_kl"] for row in history], label="train")
    kl_axis.plot(epochs, [row["validation_kl"] for row in history], label="validation")
    kl_axis.set_xlabel("epoch")
    kl_axis.set_ylabel("KL divergence per image")
    kl_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


@dataclass(frozen=True)
class RocCurve:
    label: str
    false_positive_rate: np.ndarray
    true_positive_rate: np.ndarray
    auroc: float


def plot_roc(curves: Sequence[RocCurve], path: str | Path, title: str = "") -> Path:
    figure, axis = plt.subplots(figsize=(5, 5))
    for curve in curves:
        axis.plot(curve.false_positive_rate, curve.true_positive_rate, label=f"{curve.label} (AUROC {curve.auroc:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


@dataclass(frozen=True)
class ReconstructionRow:
    title: str
    original: np.ndarray  # (H, W) in [0, 1]
    reconstruction: np.ndarray  # (H, W) in [0, 1]
    error_map: np.ndarray  # (H, W) squared error


def plot_reconstructions(rows: Sequence[ReconstructionRow], path: str | Path) -> Path:
    """Grid with one row per image: original, reconstruction and squared difference."""
    if not rows:
        raise ValueError("no images to plot")
    figure, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.2 * len(rows)), squeeze=False)
    error_top = max(float(row.error_map.max()) for row in rows) or 1.0
    for axis_row, row in zip(axes, rows):
        axis_row[0].imshow(row.original, cmap="gray", vmin=0, vmax=1)
        axis_row[1].imshow(row.reconstruction, cmap="gray", vmin=0, vmax=1)
        axis_row[2].imshow(row.error_map, cmap="magma", vmin=0, vmax=error_top)
        axis_row[0].set_ylabel(row.title, fontsize="small")
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
    for axis, heading in zip(axes[0], ("original", "reconstruction", "squared difference")):
        axis.set_title(heading, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def save_image_grid(images: np.ndarray, path: str | Path, columns: int = 4) -> Path:
    """Save ``(N, H, W)`` images in [0, 1] as one 8-bit grayscale PNG, row by row."""
    count, height, width = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width), dtype=np.uint8)
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = pixels[index]
    Image.fromarray(grid, mode="L").save(path)
    return Path(path)

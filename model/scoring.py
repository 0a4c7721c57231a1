"""Anomaly scores of preprocessed views against the healthy calibration of a checkpoint."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from model.breast import breast_threshold
from model.checkpoint import Checkpoint, load_checkpoint
from model.vae import VAE, error_map

try:
    import onnxruntime
except ImportError:  # NOTE: without onnxruntime the Scorer runs the model with torch only.
    onnxruntime = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ThresholdRule = Literal["mean", "specificity"]
THRESHOLD_RULES: tuple[str, ...] = ("mean", "specificity")
Backend = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime")
# ONNX operator set of exported models; ONNX Runtime 1.17 and later run it.
ONNX_OPSET = 17
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("reconstruction", "mu", "logvar")
PERCENTILES: tuple[float, ...] = (50.0, 75.0, 90.0, 95.0, 97.5, 99.0)
# A view/laterality group needs this many healthy calibration views before its own
# statistics replace the overall ones.
MIN_GROUP_COUNT = 10


def calibration_group(laterality: str | None, view_position: str | None) -> str:
    """Key of the calibration group of a view, such as ``"L-MLO"``."""
    return f"{laterality or '?'}-{view_position or '?'}"


def summarize_scores(scores: Sequence[float], specificity: float) -> dict[str, Any]:
    """Mean, standard deviation, percentiles and the specificity quantile of healthy scores."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot calibrate on zero healthy views")
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "percentiles": {f"{p:g}": float(np.percentile(values, p)) for p in PERCENTILES},
        "specificity_quantile": float(np.quantile(values, specificity)),
    }


def build_calibration(
    scores: Sequence[float],
    groups: Sequence[str],
    score_name: str = "global_mse",
    threshold_rule: ThresholdRule = "specificity",
    specificity: float = 0.95,
) -> dict[str, Any]:
    """Calibration statistics, overall and per group, as stored in a checkpoint."""
    check_threshold_rule(threshold_rule)
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must lie strictly between 0 and 1, got {specificity!r}")
    if len(scores) != len(groups):
        raise ValueError(f"got {len(scores)} scores but {len(groups)} group keys")
    by_group: dict[str, list[float]] = {}
    for score, group in zip(scores, groups):
        by_group.setdefault(group, []).append(float(score))
    return {
        "score": score_name,
        "threshold_rule": threshold_rule,
        "specificity": specificity,
        "overall": summarize_scores(scores, specificity),
        "groups": {key: summarize_scores(values, specificity) for key, values in sorted(by_group.items())},
    }


def check_threshold_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {list(THRESHOLD_RULES)}")


def statistics_for(calibration: dict[str, Any], group: str) -> tuple[str, dict[str, Any]]:
    """Return the group's statistics when it has enough views, else the overall ones."""
    stats = calibration.get("groups", {}).get(group)
    if stats is not None and stats["count"] >= MIN_GROUP_COUNT:
        return group, stats
    return "overall", calibration["overall"]


def threshold_for(stats: dict[str, Any], rule: ThresholdRule) -> float:
    """``mean``: anomalous above the healthy mean. ``specificity``: above the healthy quantile."""
    check_threshold_rule(rule)
    return float(stats["mean"]) if rule == "mean" else float(stats["specificity_quantile"])


def z_score(value: float, stats: dict[str, Any]) -> float | None:
    std = float(stats["std"])
    if std <= 0.0 or not math.isfinite(std):
        return None
    return (value - float(stats["mean"])) / std


@dataclass(frozen=True)
class ViewScore:
    reconstruction: np.ndarray  # float32 (H, W) in [0, 1]
    error_map: np.ndarray  # float32 (H, W), squared error per pixel
    reconstruction_error: float  # the score named by score_name
    z_score: float | None  # None without calibration
    threshold: float | None
    anomalous: bool | None
    calibration_group: str | None
    # What the score summarises, float32 (H, W): the squared error for the error scores,
    # the smoothed positive residual for the residual scores. None: same as error_map.
    score_map: np.ndarray | None = None


def export_onnx(model: VAE, destination: str | Path | io.BytesIO, opset: int = ONNX_OPSET) -> None:
    """Export ``model`` in eval mode to ONNX: input ``image`` (N, 1, H, W), outputs ``reconstruction``, ``mu``, ``logvar``.

    The batch axis is dynamic. In eval mode the decoder gets the posterior mean, so the
    exported graph is deterministic like the torch model.
    """
    model.eval()
    size = model.config.input_size
    example = torch.zeros(1, model.config.in_channels, size, size)
    dynamic_axes = {name: {0: "batch"} for name in (ONNX_INPUT, *ONNX_OUTPUTS)}
    with warnings.catch_warnings():
        # NOTE: torch 2.13 marks this TorchScript-based exporter deprecated; its
        # replacement (dynamo=True) needs the onnxscript package, which is not a dependency.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            destination,
            input_names=[ONNX_INPUT],
            output_names=list(ONNX_OUTPUTS),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )


# ONNX models exported in this process, by checkpoint SHA-256: exporting takes about a second.
_EXPORTED: dict[str, bytes] = {}


def onnx_model_bytes(checkpoint: Checkpoint, model: VAE) -> bytes:
    """Return ``model`` (built from ``checkpoint``) exported to ONNX, reusing an earlier export of the same file."""
    key = checkpoint.sha256
    if key is not None and key in _EXPORTED:
        return _EXPORTED[key]
    buffer = io.BytesIO()
    export_onnx(model, buffer)
    if key is not None:
        _EXPORTED[key] = buffer.getvalue()
    return buffer.getvalue()


def onnxruntime_session(model_bytes: bytes, threads: int | None) -> Any:
    """Create an ONNX Runtime CPU session with ``threads`` intra-op threads (default 1) that do not spin.

    Spinning threads wait for work at full CPU, which slows down every other process on
    a shared machine, so spinning is turned off.
    """
    if onnxruntime is None:
        raise RuntimeError("the onnxruntime package is not installed; install it or use backend='torch'")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def resolve_backend(backend: str) -> str:
    """Return "torch" or "onnxruntime" for a requested backend; "auto" prefers ONNX Runtime when installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":
        return "onnxruntime" if onnxruntime is not None else "torch"
    return backend


class Scorer:
    """Scores preprocessed views with a checkpoint's VAE, using the latent mean.

    ``backend`` "onnxruntime" runs the model exported to ONNX in memory, "torch" runs it
    with torch, and "auto" (the default) takes ONNX Runtime when it is installed.
    ``threads`` sets the intra-op threads of that backend; for torch this is the
    process-wide ``torch.set_num_threads``.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path | None = None,
        threshold_rule: ThresholdRule | None = None,
        threads: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = load_checkpoint(checkpoint)
        self.checkpoint = checkpoint
        self.model = checkpoint.build_model()
        calibration = checkpoint.calibration
        self.threshold_rule: ThresholdRule = threshold_rule or (
            calibration["threshold_rule"] if calibration else "specificity"
        )
        check_threshold_rule(self.threshold_rule)
        self.definition = score_definition(checkpoint.score_name)
        self.settings = ScoreSettings.from_checkpoint(checkpoint)
        self.backend = resolve_backend(backend)
        self.session: Any = None
        if self.backend == "onnxruntime":
            self.session = onnxruntime_session(onnx_model_bytes(checkpoint, self.model), threads)
            logger.debug("Scoring with ONNX Runtime %s, %s intra-op threads", onnxruntime.__version__, threads or 1)
        elif threads is not None:
            torch.set_num_threads(threads)

    @property
    def model_version(self) -> str:
        return self.checkpoint.model_version

    @property
    def preprocessing_version(self) -> str:
        return self.checkpoint.preprocessing_version

    @property
    def view_size(self) -> int:
        """Size in pixels (rows and columns) at which views must be preprocessed for this checkpoint."""
        return self.settings.view_size(self.checkpoint.model_config.input_size)

    @property
    def pairwise(self) -> bool:
        """True when the score compares a view with the other breast's view (see :meth:`judge_pair`)."""
        return self.definition.pairwise

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return reconstructions, error maps and per-image errors for ``(N, H, W)`` images."""
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
        if self.session is not None:
            (output,) = self.session.run([ONNX_OUTPUTS[0]], {ONNX_INPUT: batch.numpy()})
            reconstruction = torch.from_numpy(output)
        else:
            reconstruction, _, _ = self.model(batch)
        per_pixel, per_image = error_map(reconstruction, batch)
        return reconstruction[:, 0].numpy(), per_pixel[:, 0].numpy(), per_image.numpy().astype(np.float64)

    def score_batch(
        self,
        images: np.ndarray,
        lateralities: Sequence[str | None],
        view_positions: Sequence[str | None],
    ) -> list[ViewScore]:
        """Score views ``(N, S, S)`` preprocessed at :attr:`view_size` pixels.

        For a pairwise score each ViewScore contains the per-view score, unjudged. Pass two
        of them to :meth:`judge_pair`.
        """
        if self.definition.name == "global_mse" and self.settings.resolution_policy == "whole":
            reconstructions, maps, errors = self.reconstruct(images)
            return [
                self._judge(reconstructions[i], maps[i], float(errors[i]), lateralities[i], view_positions[i])
                for i in range(len(errors))
            ]
        return [
            self._score_view(image, laterality, view_position)
            for image, laterality, view_position in zip(images, lateralities, view_positions)
        ]

    def view_maps(self, image: np.ndarray) -> ViewMaps:
        """Reconstruction, error, residual and KL maps of one view, as the registered scores read them."""
        return view_maps(self.run_model, image, self.settings)

    @torch.no_grad()
    def run_model(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return reconstructions with the latent mean and the KL divergence of ``(N, H, W)`` inputs."""
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
        if self.session is not None:
            reconstruction, mu, logvar = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: batch.numpy()})
        else:
            mu_tensor, logvar_tensor = self.model.encode(batch)
            reconstruction = self.model.decode(mu_tensor).numpy()
            mu, logvar = mu_tensor.numpy(), logvar_tensor.numpy()
        return np.asarray(reconstruction)[:, 0], kl_divergence(mu, logvar)

    def score_values(self, images: np.ndarray) -> np.ndarray:
        """Per-view scores of views ``(N, S, S)``, the values a calibration is built from."""
        if self.definition.name == "global_mse" and self.settings.resolution_policy == "whole":
            return self.reconstruct(images)[2]
        return np.array(
            [self.definition.summarize(self.view_maps(image))[0] for image in images], dtype=np.float64
        )

    def _score_view(self, image: np.ndarray, laterality: str | None, view_position: str | None) -> ViewScore:
        maps = self.view_maps(image)
        value, score_map = self.definition.summarize(maps)
        if self.definition.pairwise:
            return ViewScore(maps.reconstruction, maps.squared_error, value, None, None, None, None, score_map)
        return self._judge(maps.reconstruction, maps.squared_error, value, laterality, view_position, score_map)

    def judge_pair(
        self,
        own: ViewScore,
        partner: ViewScore,
        laterality: str | None = None,
        view_position: str | None = None,
    ) -> ViewScore:
        """Judge a pairwise score: ``own`` minus ``partner``, the same view of the other breast.

        Both ViewScores come from :meth:`score` with this Scorer. The result keeps
        ``own``'s maps and carries the difference as its score.
        """
        if not self.definition.pairwise:
            raise ValueError(f"score {self.definition.name!r} is judged per view; judge_pair needs a contra_ score")
        value = pairwise_value(own.reconstruction_error, partner.reconstruction_error)
        return self._judge(own.reconstruction, own.error_map, value, laterality, view_position, own.score_map)

    def score(
        self, image: np.ndarray, laterality: str | None = None, view_position: str | None = None
    ) -> ViewScore:
        return self.score_batch(image[None], [laterality], [view_position])[0]

    def _judge(
        self,
        reconstruction: np.ndarray,
        per_pixel: np.ndarray,
        value: float,
        laterality: str | None,
        view_position: str | None,
        score_map: np.ndarray | None = None,
    ) -> ViewScore:
        calibration = self.checkpoint.calibration
        if not calibration:
            return ViewScore(reconstruction, per_pixel, value, None, None, None, None, score_map)
        group, stats = statistics_for(calibration, calibration_group(laterality, view_position))
        threshold = threshold_for(stats, self.threshold_rule)
        return ViewScore(
            reconstruction=reconstruction,
            error_map=per_pixel,
            reconstruction_error=value,
            z_score=z_score(value, stats),
            threshold=threshold,
            anomalous=value > threshold,
            calibration_group=group,
            score_map=score_map,
        )


# --------------------------------------------------------------------------- score registry
#
# A checkpoint's ``score_name`` picks one of SCORES, and its ``training["scoring"]``
# entry (ScoreSettings) sets whether views are scored whole at the VAE's input size or
# as a grid of patches of a larger view. docs/detection.md compares the scores.

# Gaussian smoothing of the view before the breast threshold, in pixels of a 128-pixel
# view; scaled with the view size.
MASK_SIGMA_128 = 1.0
# Smoothing of the positive residual, in pixels of a 128-pixel view and scaled with the
# view size. The median mini-MIAS mass has a radius of 6 pixels in such a view.
RESIDUAL_SIGMA_128 = 2.0
RESIDUAL_PERCENTILE = 99.0
RESOLUTION_POLICIES: tuple[str, ...] = ("whole", "patches")
SCORING_KEY = "scoring"

# Callable that runs the VAE on inputs (N, H, W) with the latent mean and returns their
# reconstructions (N, H, W) and the KL divergence of each posterior from the prior (N,).
ModelRun = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ScoreSettings:
    """Settings that cut views for scoring, stored in a checkpoint's ``training["scoring"]``.

    ``whole``: the view is preprocessed at the VAE's input size and scored at once.
    ``patches``: the view is preprocessed at ``patch_resolution`` pixels, cut into
    ``patch_size`` patches every ``patch_stride`` pixels where at least
    ``min_coverage`` of the patch is breast, and the patch maps are averaged where
    patches overlap.
    """

    resolution_policy: str = "whole"
    patch_resolution: int = 512
    patch_size: int = 128
    patch_stride: int = 64
    min_coverage: float = 0.5

    def __post_init__(self) -> None:
        if self.resolution_policy not in RESOLUTION_POLICIES:
            raise ValueError(
                f"resolution_policy {self.resolution_policy!r} is not one of {list(RESOLUTION_POLICIES)}"
            )
        if self.patch_size > self.patch_resolution:
            raise ValueError(f"patch_size {self.patch_size} exceeds patch_resolution {self.patch_resolution}")
        if self.patch_stride < 1:
            raise ValueError(f"patch_stride must be at least 1 pixel, got {self.patch_stride}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must lie in [0, 1], got {self.min_coverage}")

    def view_size(self, input_size: int) -> int:
        """Size in pixels at which views must be preprocessed for a VAE of ``input_size``."""
        return self.patch_resolution if self.resolution_policy == "patches" else input_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ScoreSettings:
        values = dict(values or {})
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown scoring settings {unknown}; accepted keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> ScoreSettings:
        """Read the checkpoint's settings; a checkpoint without them scores whole views."""
        settings = cls.from_dict(checkpoint.training.get(SCORING_KEY))
        if settings.resolution_policy == "patches" and settings.patch_size != checkpoint.model_config.input_size:
            raise ValueError(
                f"checkpoint scores {settings.patch_size}-pixel patches but its VAE takes "
                f"{checkpoint.model_config.input_size}-pixel inputs"
            )
        return settings


def breast_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the breast in a preprocessed view, holes filled.

    The view is smoothed and thresholded between the background and the skin line with
    ``model.breast.breast_threshold``, and the largest connected component is kept, so
    film labels and the zero padding of the square resize fall outside. A view with no
    pixel above the threshold gives an all-False mask.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"breast_mask expects a 2-D view, got shape {image.shape}")
    smoothed = ndimage.gaussian_filter(image, MASK_SIGMA_128 * max(image.shape) / 128.0)
    foreground = smoothed > breast_threshold(smoothed.ravel())
    labels, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))


def coverage_map(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Share of breast pixels in the patch at every top-left position, shape ``(H-p+1, W-p+1)``."""
    height, width = mask.shape
    if patch_size > min(height, width):
        raise ValueError(f"patch size {patch_size} exceeds the view's {height} x {width} pixels")
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    p = patch_size
    sums = integral[p:, p:] - integral[:-p, p:] - integral[p:, :-p] + integral[:-p, :-p]
    return sums / float(p * p)


def grid_starts(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Start offsets every ``stride`` pixels, plus one flush with the far edge."""
    last = length - patch_size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return np.array(starts, dtype=np.int64)


def patch_grid(mask: np.ndarray, patch_size: int, stride: int, min_coverage: float = 0.5) -> np.ndarray:
    """Top-left corners ``(K, 2)`` of the grid patches that are at least ``min_coverage`` breast.

    The grid covers the whole view, its last row and column flush with the edges.
    When no patch reaches ``min_coverage`` the patch with the most breast is returned
    alone, so every view gets a score.
    """
    if stride < 1:
        raise ValueError(f"patch stride must be at least 1 pixel, got {stride}")
    coverage = coverage_map(mask, patch_size)
    rows = grid_starts(mask.shape[0], patch_size, stride)
    columns = grid_starts(mask.shape[1], patch_size, stride)
    positions = np.array([(row, column) for row in rows for column in columns], dtype=np.int64)
    covered = coverage[positions[:, 0], positions[:, 1]]
    kept = positions[covered >= min_coverage]
    if len(kept) == 0:
        kept = positions[[int(np.argmax(covered))]]
    return kept


def extract_patches(image: np.ndarray, positions: np.ndarray, patch_size: int) -> np.ndarray:
    """Patches ``(K, p, p)`` of ``image`` at the top-left ``positions``."""
    patches = np.empty((len(positions), patch_size, patch_size), dtype=np.float32)
    for index, (row, column) in enumerate(positions):
        patches[index] = image[row : row + patch_size, column : column + patch_size]
    return patches


def assemble_map(patch_maps: np.ndarray, positions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Average per-pixel patch values ``(K, p, p)`` where patches overlap; NaN where none lies."""
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    patch_size = patch_maps.shape[-1]
    for values, (row, column) in zip(patch_maps, positions):
        total[row : row + patch_size, column : column + patch_size] += values
        count[row : row + patch_size, column : column + patch_size] += 1.0
    result = np.full(shape, np.nan, dtype=np.float64)
    np.divide(total, count, out=result, where=count > 0)
    return result.astype(np.float32)


@dataclass(frozen=True)
class ViewMaps:
    """Maps of one view at its preprocessed size, from which every registered score is taken."""

    reconstruction: np.ndarray  # float32, the view itself where no patch was scored
    squared_error: np.ndarray  # float32, 0 where no patch was scored
    residual: np.ndarray  # float32, smoothed positive part of view minus reconstruction
    mask: np.ndarray  # bool, breast pixels that were scored
    kl: np.ndarray  # float64 (K,), KL divergence of each input: the view, or each patch
    kl_map: np.ndarray  # float32, each patch's KL averaged where patches overlap, 0 elsewhere
    patch_positions: np.ndarray | None = None  # (K, 2) top-left corners in patch mode


def residual_sigma(size: int) -> float:
    return RESIDUAL_SIGMA_128 * size / 128.0


def kl_divergence(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL divergence of each diagonal Gaussian posterior ``(N, L)`` from the standard normal prior."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    return 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=1)


def view_maps(run: ModelRun, image: np.ndarray, settings: ScoreSettings) -> ViewMaps:
    """Run the VAE on one view, whole or patch by patch, and derive its error, residual and KL maps."""
    image = np.asarray(image, dtype=np.float32)
    mask = breast_mask(image)
    if settings.resolution_policy == "whole":
        outputs, kl = run(image[None])
        reconstruction = np.asarray(outputs[0], dtype=np.float32)
        squared = (reconstruction - image) ** 2
        positive = np.clip(image - reconstruction, 0.0, None)
        kl = np.asarray(kl, dtype=np.float64)
        kl_map = np.full(image.shape, float(kl[0]), dtype=np.float32)
        positions = None
        scored = mask
    else:
        if image.shape != (settings.patch_resolution, settings.patch_resolution):
            raise ValueError(
                f"view is {image.shape[0]} x {image.shape[1]} pixels; patch scoring expects "
                f"{settings.patch_resolution} x {settings.patch_resolution}, so preprocess at that size"
            )
        positions = patch_grid(mask, settings.patch_size, settings.patch_stride, settings.min_coverage)
        patches = extract_patches(image, positions, settings.patch_size)
        outputs, kl = run(patches)
        reconstructed = np.asarray(outputs, dtype=np.float32)
        kl = np.asarray(kl, dtype=np.float64)
        spread = np.broadcast_to(kl[:, None, None], patches.shape).astype(np.float32)
        kl_map = np.nan_to_num(assemble_map(spread, positions, image.shape))
        assembled = assemble_map(reconstructed, positions, image.shape)
        covered = np.isfinite(assembled)
        reconstruction = np.where(covered, assembled, image)
        squared = np.nan_to_num(assemble_map((reconstructed - patches) ** 2, positions, image.shape))
        positive = np.nan_to_num(assemble_map(np.clip(patches - reconstructed, 0.0, None), positions, image.shape))
        scored = mask & covered
    residual = ndimage.gaussian_filter(positive, residual_sigma(image.shape[0])).astype(np.float32)
    return ViewMaps(
        reconstruction=reconstruction.astype(np.float32),
        squared_error=squared.astype(np.float32),
        residual=residual,
        mask=scored,
        kl=kl,
        kl_map=kl_map,
        patch_positions=positions,
    )


def inside_or_all(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Values inside ``mask``, or all of them when the mask is empty."""
    return values[mask] if mask.any() else values.ravel()


def global_mse(maps: ViewMaps) -> tuple[float, np.ndarray]:
    return float(maps.squared_error.mean()), maps.squared_error


def breast_mse(maps: ViewMaps) -> tuple[float, np.ndarray]:
    return float(inside_or_all(maps.squared_error, maps.mask).mean()), np.where(maps.mask, maps.squared_error, 0.0)


def residual_p99(maps: ViewMaps) -> tuple[float, np.ndarray]:
    value = float(np.percentile(inside_or_all(maps.residual, maps.mask), RESIDUAL_PERCENTILE))
    return value, np.where(maps.mask, maps.residual, 0.0)


def residual_max(maps: ViewMaps) -> tuple[float, np.ndarray]:
    return float(inside_or_all(maps.residual, maps.mask).max()), np.where(maps.mask, maps.residual, 0.0)


def kl_mean(maps: ViewMaps) -> tuple[float, np.ndarray]:
    return float(maps.kl.mean()), np.where(maps.mask, maps.kl_map, 0.0)


@dataclass(frozen=True)
class ScoreDefinition:
    """A registered score: the function that takes one view's value and map from its ViewMaps.

    A ``pairwise`` score compares a view with the same view of the other breast: its
    value is this view's ``base`` score minus the other view's, and only that
    difference is calibrated.
    """

    name: str
    summarize: Callable[[ViewMaps], tuple[float, np.ndarray]]
    description: str
    pairwise: bool = False
    base: str | None = None  # name of the per-view score a pairwise score compares

    @property
    def view_score_name(self) -> str:
        """Name of the per-view score computed for each view."""
        return self.base or self.name


CONTRALATERAL_PREFIX = "contra_"


def _register(*definitions: ScoreDefinition) -> dict[str, ScoreDefinition]:
    registry = {definition.name: definition for definition in definitions}
    for definition in definitions:
        if not definition.pairwise:
            name = f"{CONTRALATERAL_PREFIX}{definition.name}"
            registry[name] = ScoreDefinition(
                name=name,
                summarize=definition.summarize,
                description=f"{definition.description}, minus the same score of the other breast's same view",
                pairwise=True,
                base=definition.name,
            )
    return registry


SCORES: dict[str, ScoreDefinition] = _register(
    ScoreDefinition("global_mse", global_mse, "mean squared error over the whole view"),
    ScoreDefinition("breast_mse", breast_mse, "mean squared error over the breast"),
    ScoreDefinition(
        "residual_p99", residual_p99, "99th percentile over the breast of the smoothed positive residual"
    ),
    ScoreDefinition("residual_max", residual_max, "maximum over the breast of the smoothed positive residual"),
    ScoreDefinition(
        "kl_mean", kl_mean, "KL divergence of the posterior from the prior, averaged over the patches (or of the view)"
    ),
)


def score_definition(name: str) -> ScoreDefinition:
    """Look up the registered score called ``name``; an unknown name raises ValueError."""
    if name not in SCORES:
        raise ValueError(f"score {name!r} is not registered; registered scores are {sorted(SCORES)}")
    return SCORES[name]


def pairwise_value(own: float, partner: float) -> float:
    """Value of a pairwise score: this view's per-view score minus the other breast's."""
    return float(own) - float(partner)

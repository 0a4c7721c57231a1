"""Anomaly scores of preprocessed views against the healthy calibration of a checkpoint."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

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
        reconstructions, maps, errors = self.reconstruct(images)
        return [
            self._judge(reconstructions[i], maps[i], float(errors[i]), lateralities[i], view_positions[i])
            for i in range(len(errors))
        ]

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
    ) -> ViewScore:
        calibration = self.checkpoint.calibration
        if not calibration:
            return ViewScore(reconstruction, per_pixel, value, None, None, None, None)
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
        )

"""Self-describing checkpoints: weights, model config, preprocessing version, calibration."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from model.vae import VAE, VAEConfig

CHECKPOINT_FORMAT = "mammo-vae-checkpoint/1"
REQUIRED_KEYS = ("format", "model_config", "state_dict", "preprocessing_version")
DEFAULT_CHECKPOINT_NAME = "default.pt"


def default_checkpoint_path() -> Path:
    """Path of the checkpoint shipped inside the ``model`` package."""
    return Path(str(resources.files("model") / "checkpoints" / DEFAULT_CHECKPOINT_NAME))


def code_version() -> str:
    """Installed version of this project, for the checkpoint's provenance."""
    try:
        from importlib.metadata import version

        return version("mammo-vae-worker")
    except Exception:  # noqa: BLE001 - a source tree without an install has no metadata
        return "unknown"


@dataclass
class Checkpoint:
    """Contents of a checkpoint file, with the model built from them."""

    model_config: VAEConfig
    state_dict: dict[str, torch.Tensor]
    preprocessing_version: str
    calibration: dict[str, Any] | None = None
    data_summary: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    code_version: str = "unknown"
    score_name: str = "global_mse"
    sha256: str | None = None  # of the file it was loaded from

    @property
    def model_version(self) -> str:
        """Short content hash that result rows store to name the checkpoint."""
        if self.sha256 is None:
            raise ValueError("checkpoint was not loaded from a file, so it has no content hash")
        return self.sha256[:16]

    def build_model(self) -> VAE:
        """Return the VAE with these weights, in eval mode."""
        model = VAE(self.model_config)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "state_dict": self.state_dict,
            "preprocessing_version": self.preprocessing_version,
            "calibration": self.calibration,
            "data_summary": self.data_summary,
            "split": self.split,
            "training": self.training,
            "code_version": self.code_version,
            "score_name": self.score_name,
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write ``checkpoint`` atomically and return its path."""
    return save_payload(checkpoint.to_dict(), path)


def save_payload(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dictionary atomically (temporary file, fsync, rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates the file with mode 0600; 0644 lets a worker running as
        # another user read the checkpoint.
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its keys.

    ``None`` loads the shipped default checkpoint.
    """
    path = Path(path) if path is not None else default_checkpoint_path()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found; pass the path of a model.pt file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} could not be read as a torch checkpoint: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {str(path)!r} contains a {type(raw).__name__}, expected a dict")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks the keys {missing}; it was not written by training.fit")
    if raw["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {raw['format']!r}; this version reads {CHECKPOINT_FORMAT!r}"
        )
    return Checkpoint(
        model_config=VAEConfig.from_dict(raw["model_config"]),
        state_dict=raw["state_dict"],
        preprocessing_version=raw["preprocessing_version"],
        calibration=raw.get("calibration"),
        data_summary=raw.get("data_summary") or {},
        split=raw.get("split") or {},
        training=raw.get("training") or {},
        code_version=raw.get("code_version", "unknown"),
        score_name=raw.get("score_name", "global_mse"),
        sha256=file_sha256(path),
    )

"""Training step, epoch, validation and checkpoint files of the VAE."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import save_payload
from model.vae import VAE, elbo_loss

RESUME_KEY = "resume"


@dataclass
class LossTotals:
    """Sums of the per-image loss terms over the images seen, for averaging across batches and ranks."""

    loss: float = 0.0
    reconstruction: float = 0.0
    kl: float = 0.0
    count: int = 0

    def add(self, loss: torch.Tensor, reconstruction: torch.Tensor, kl: torch.Tensor, batch: int) -> None:
        # elbo_loss returns batch means, so multiply back to sums.
        self.loss += float(loss) * batch
        self.reconstruction += float(reconstruction) * batch
        self.kl += float(kl) * batch
        self.count += batch

    def all_reduce(self) -> LossTotals:
        """Sum the totals of every rank when torch.distributed is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        values = torch.tensor([self.loss, self.reconstruction, self.kl, float(self.count)], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return LossTotals(float(values[0]), float(values[1]), float(values[2]), int(values[3]))

    def means(self) -> dict[str, float]:
        """Per-image means of the negative ELBO and its terms."""
        if self.count == 0:
            return {"loss": float("nan"), "reconstruction": float("nan"), "kl": float("nan")}
        return {
            "loss": self.loss / self.count,
            "reconstruction": self.reconstruction / self.count,
            "kl": self.kl / self.count,
        }


def unwrap(model: nn.Module) -> VAE:
    """The VAE inside a DistributedDataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, VAE):
        raise TypeError(f"expected a VAE or a wrapper of one, got {type(inner).__name__}")
    return inner


def train_step(
    model: nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    totals: LossTotals,
) -> float:
    """Run one optimisation step on ``batch`` (N, 1, H, W) and return its loss."""
    config = unwrap(model).config
    reconstruction, mu, logvar = model(batch)
    loss, recon, kl = elbo_loss(
        reconstruction, batch, mu, logvar, beta=config.beta, reconstruction_loss=config.reconstruction_loss
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    totals.add(loss.detach(), recon.detach(), kl.detach(), batch.shape[0])
    return float(loss.detach())


def train_epoch(
    model: nn.Module,
    batches: Iterable[torch.Tensor | list[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    progress: Any = None,
) -> LossTotals:
    """Train on every batch once and return this rank's loss totals.

    ``progress`` is an optional tqdm bar that advances by one per batch.
    """
    model.train()
    totals = LossTotals()
    for batch in batches:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        loss = train_step(model, images, optimizer, totals)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.1f}")
    return totals


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[torch.Tensor | list[torch.Tensor]]) -> LossTotals:
    """Loss totals in eval mode, where the decoder gets the posterior mean."""
    model.eval()
    config = unwrap(model).config
    totals = LossTotals()
    for batch in batches:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        reconstruction, mu, logvar = model(images)
        loss, recon, kl = elbo_loss(
            reconstruction, images, mu, logvar, beta=config.beta, reconstruction_loss=config.reconstruction_loss
        )
        totals.add(loss, recon, kl, images.shape[0])
    return totals


def write_checkpoint_dict(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dictionary atomically (temporary file, fsync, rename)."""
    return save_payload(payload, path)


def read_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file as a plain dictionary with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} contains a {type(payload).__name__}, expected a dict")
    return payload


@dataclass
class ResumeState:
    """Optimizer and loop state that ``last.pt`` adds to a checkpoint so that training can continue."""

    epoch: int  # epochs completed
    optimizer_state: dict[str, Any]
    best_validation_loss: float
    best_epoch: int
    history: list[dict[str, float]]
    elapsed_seconds: float  # training time of the completed epochs
    stopped_by_time_limit: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "optimizer_state": self.optimizer_state,
            "best_validation_loss": self.best_validation_loss,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "elapsed_seconds": self.elapsed_seconds,
            "stopped_by_time_limit": self.stopped_by_time_limit,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResumeState:
        return cls(
            epoch=int(values["epoch"]),
            optimizer_state=values["optimizer_state"],
            best_validation_loss=float(values["best_validation_loss"]),
            best_epoch=int(values["best_epoch"]),
            history=list(values["history"]),
            elapsed_seconds=float(values.get("elapsed_seconds", 0.0)),
            stopped_by_time_limit=bool(values.get("stopped_by_time_limit", False)),
        )


def save_last(checkpoint_payload: dict[str, Any], state: ResumeState, path: str | Path) -> Path:
    """Write ``last.pt``: a full checkpoint plus the optimizer and loop state under ``"resume"``."""
    return write_checkpoint_dict({**checkpoint_payload, RESUME_KEY: state.to_dict()}, path)


def load_last(path: str | Path) -> tuple[dict[str, Any], ResumeState]:
    """Read ``last.pt`` back into its checkpoint dictionary and resume state."""
    payload = read_checkpoint_dict(path)
    if RESUME_KEY not in payload:
        raise ValueError(f"{path} has no {RESUME_KEY!r} entry; --resume needs the last.pt written by training.fit")
    return payload, ResumeState.from_dict(payload.pop(RESUME_KEY))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the sampling noise in one epoch on one rank.

    Seeding every epoch afresh makes a resumed run draw the same noise as an
    uninterrupted one without storing generator states.
    """
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)

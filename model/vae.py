"""Convolutional variational autoencoder for 1x128x128 mammography views."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

ReconstructionLoss = Literal["bce", "mse"]


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`VAE`.

    The encoder has ``num_blocks`` blocks of a 3x3 convolution, ReLU and 2x2 max
    pooling. Block ``i`` has ``initial_channels * 2**i`` channels. The decoder mirrors
    it with 3x3 transposed convolutions of stride 2, so ``input_size`` must be
    divisible by ``2**num_blocks``.
    """

    input_size: int = 128
    in_channels: int = 1
    initial_channels: int = 32
    num_blocks: int = 4
    latent_size: int = 1024
    beta: float = 1.0
    reconstruction_loss: ReconstructionLoss = "bce"

    def __post_init__(self) -> None:
        for name in ("input_size", "in_channels", "initial_channels", "num_blocks", "latent_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive integer, got {value!r}")
        if self.input_size % (2**self.num_blocks):
            raise ValueError(
                f"VAEConfig.input_size={self.input_size} is not divisible by "
                f"2**num_blocks={2**self.num_blocks}; use a multiple of it"
            )
        if self.beta < 0:
            raise ValueError(f"VAEConfig.beta must be >= 0, got {self.beta!r}")
        if self.reconstruction_loss not in ("bce", "mse"):
            raise ValueError(
                f"VAEConfig.reconstruction_loss={self.reconstruction_loss!r} is not one of 'bce', 'mse'"
            )

    @property
    def feature_channels(self) -> int:
        """Channels of the last encoder block."""
        return self.initial_channels * 2 ** (self.num_blocks - 1)

    @property
    def feature_size(self) -> int:
        """Height and width of the last encoder block's output."""
        return self.input_size // 2**self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig keys {unknown}; accepted keys are {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, VAEConfig] = {
    # The reference network: 32-64-128-256 channels, latent 1024, about 51 M parameters.
    "seed": VAEConfig(),
    # Same encoder and decoder with smaller latent spaces; the linear layers dominate
    # the parameter count, so these fit in a small shipped checkpoint.
    "latent128": VAEConfig(latent_size=128),
    "latent64": VAEConfig(latent_size=64),
    "latent16": VAEConfig(latent_size=16),
    "latent4": VAEConfig(latent_size=4),
    # Half the channels and latent 16: for tests and quick experiments.
    "tiny": VAEConfig(initial_channels=8, latent_size=16),
}


def preset(name: str, **overrides: Any) -> VAEConfig:
    """Return the named preset, with ``overrides`` replacing some of its fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted presets are {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class VAE(nn.Module):
    """Variational autoencoder with a diagonal Gaussian posterior.

    In training mode :meth:`forward` samples the latent code with the
    reparameterisation trick. In eval mode it uses the posterior mean, so the same
    input always gives the same reconstruction.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAEConfig()
        cfg = self.config

        encoder: list[nn.Module] = []
        channels = cfg.in_channels
        for block in range(cfg.num_blocks):
            out_channels = cfg.initial_channels * 2**block
            encoder += [
                nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out_channels
        self.encoder = nn.Sequential(*encoder)

        flat = cfg.feature_channels * cfg.feature_size**2
        self.fc_mu = nn.Linear(flat, cfg.latent_size)
        self.fc_logvar = nn.Linear(flat, cfg.latent_size)
        self.fc_decode = nn.Linear(cfg.latent_size, flat)

        decoder: list[nn.Module] = []
        for block in reversed(range(cfg.num_blocks)):
            out_channels = cfg.initial_channels * 2 ** (block - 1) if block else cfg.in_channels
            decoder.append(
                nn.ConvTranspose2d(
                    channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1
                )
            )
            if block:
                decoder.append(nn.ReLU(inplace=True))
            channels = out_channels
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and log-variance for a batch ``(N, C, H, W)``."""
        features = self.encoder(x).flatten(1)
        return self.fc_mu(features), self.fc_logvar(features)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Draw ``z = mu + sigma * eps`` in training mode; return ``mu`` in eval mode."""
        if not self.training:
            return mu
        std = torch.exp(0.5 * logvar)
        return mu + std * torch.randn_like(std)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Map latent codes ``(N, latent_size)`` to images in [0, 1]."""
        cfg = self.config
        features = self.fc_decode(z).view(-1, cfg.feature_channels, cfg.feature_size, cfg.feature_size)
        return torch.sigmoid(self.decoder(F.relu(features)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``count`` latent codes drawn from the standard normal prior."""
        device = self.fc_decode.weight.device
        z = torch.randn(count, self.config.latent_size, generator=generator).to(device)
        return self.decode(z)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def elbo_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    reconstruction_loss: ReconstructionLoss = "bce",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the negative ELBO, its reconstruction term and its KL term, each averaged over the batch.

    The reconstruction term is summed over pixels, either binary cross-entropy (the
    reference) or squared error. The KL term is the closed form for a diagonal Gaussian
    posterior against the standard normal prior, summed over latent dimensions and
    scaled by ``beta`` in the total.
    """
    batch = target.shape[0]
    if reconstruction_loss == "bce":
        recon = F.binary_cross_entropy(reconstruction, target, reduction="sum") / batch
    elif reconstruction_loss == "mse":
        recon = F.mse_loss(reconstruction, target, reduction="sum") / batch
    else:
        raise ValueError(f"reconstruction_loss={reconstruction_loss!r} is not one of 'bce', 'mse'")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / batch
    return recon + beta * kl, recon, kl


def error_map(reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-pixel squared error ``(N, 1, H, W)`` and the per-image mean ``(N,)``."""
    per_pixel = (reconstruction - target).pow(2)
    return per_pixel, per_pixel.flatten(1).mean(dim=1)

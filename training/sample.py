"""Decode draws from the standard normal prior of a checkpoint's VAE into a PNG grid.

Usage::

    python -m training.sample --checkpoint runs/mias/model.pt --count 16 --out samples.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from training.cli import configure_logging
from training.plots import save_image_grid

logger = logging.getLogger(__name__)


def draw_samples(checkpoint_path: Path | None, count: int, seed: int) -> np.ndarray:
    """Return ``count`` decoded prior samples as float32 ``(count, H, W)`` in [0, 1]."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build_model()
    generator = torch.Generator().manual_seed(seed)
    return model.sample(count, generator=generator)[:, 0].numpy()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.sample", description="Save images decoded from the VAE's prior as one PNG grid."
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file (default: the shipped model/checkpoints/default.pt)"
    )
    parser.add_argument("--count", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--columns", type=int, default=4, help="images per grid row (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.columns < 1:
        parser.error(f"--columns must be at least 1, got {args.columns}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    images = draw_samples(args.checkpoint, args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, args.out, columns=args.columns)
    logger.info("wrote %d prior samples to %s", args.count, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

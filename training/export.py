"""Export a checkpoint's VAE to ONNX and check it against torch with ONNX Runtime.

Usage::

    python -m training.export --checkpoint runs/mias/model.pt --onnx runs/mias/model.onnx

The ONNX graph takes ``image`` (N, 1, 128, 128) float32 in [0, 1] with a dynamic batch
axis and returns ``reconstruction``, ``mu`` and ``logvar``. It is the eval-mode network,
which decodes the posterior mean. The worker builds the same graph in memory from the
checkpoint (``model.scoring.Scorer`` with the ``onnxruntime`` backend), so the file is
for other runtimes and for inspection.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from model.checkpoint import load_checkpoint
from model.scoring import ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUTS, export_onnx, onnxruntime_session
from training.cli import configure_logging

logger = logging.getLogger(__name__)

# Largest difference allowed between the ONNX Runtime and torch outputs of the check batch.
CHECK_TOLERANCE = 1e-4
CHECK_BATCH = 4


def export_checkpoint(checkpoint_path: Path | None, onnx_path: Path, opset: int = ONNX_OPSET) -> float:
    """Write the checkpoint's model to ``onnx_path`` atomically; return the largest output difference to torch.

    The check runs a seeded batch of CHECK_BATCH random images through both runtimes
    and raises ValueError when an output differs by more than CHECK_TOLERANCE.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build_model()
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{onnx_path.name}.", dir=onnx_path.parent)
    os.close(handle)
    try:
        export_onnx(model, temporary, opset=opset)
        onnx.checker.check_model(temporary, full_check=True)
        difference = compare_with_torch(model, Path(temporary).read_bytes())
        if difference > CHECK_TOLERANCE:
            raise ValueError(
                f"ONNX Runtime output differs from torch by {difference:.3g}, more than {CHECK_TOLERANCE:g}; "
                "the export is not written"
            )
        os.replace(temporary, onnx_path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    logger.info(
        "wrote %s (opset %d, model version %s); largest difference to torch %.2g",
        onnx_path,
        opset,
        checkpoint.model_version,
        difference,
    )
    return difference


@torch.no_grad()
def compare_with_torch(model: torch.nn.Module, model_bytes: bytes) -> float:
    """Largest absolute difference between torch and ONNX Runtime outputs on a seeded batch."""
    model.eval()
    size = model.config.input_size
    images = torch.rand(CHECK_BATCH, 1, size, size, generator=torch.Generator().manual_seed(0))
    expected = model(images)
    session = onnxruntime_session(model_bytes, threads=1)
    outputs = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: images.numpy()})
    return max(float(np.abs(output - reference.numpy()).max()) for output, reference in zip(outputs, expected))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a checkpoint's VAE to an ONNX file and check it against torch with ONNX Runtime.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file (default: the shipped model/checkpoints/default.pt)"
    )
    parser.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX operator set version (default {ONNX_OPSET})")
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    try:
        export_checkpoint(args.checkpoint, args.onnx, args.opset)
    except (FileNotFoundError, ValueError) as err:
        logger.error("export failed: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

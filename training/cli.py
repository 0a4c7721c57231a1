"""Command-line pieces shared by the training commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.cache import default_threads
from training.data import DATA_FORMATS, ImageRecord, load_records
from training.patches import DEFAULT_PATCHES_PER_VIEW


def configure_logging(verbose: bool = False, rank: int = 0) -> None:
    """Log to stderr: INFO (DEBUG with ``verbose``) on rank 0, warnings only on other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add --data-format, --data, --views, --vindr-split, --cache-dir and --threads."""
    parser.add_argument(
        "--data-format", choices=DATA_FORMATS, required=required,
        help="layout of --data: the mini-MIAS folder, a VinDr-Mammo annotation CSV (or its folder), "
        "or a folder of healthy images",
    )
    parser.add_argument("--data", type=Path, required=required, help="folder or CSV file of the data set")
    parser.add_argument(
        "--views", default=None,
        help="comma-separated view positions to keep, such as MLO or CC,MLO (VinDr only; default all)",
    )
    parser.add_argument(
        "--vindr-split", default=None, help="keep only rows with this value in the VinDr 'split' column (training, test)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="folder of the preprocessed image cache (default: 'cache' beside the output)",
    )
    parser.add_argument(
        "--threads", type=int, default=default_threads(),
        help="PyTorch threads and preprocessing processes (default: the CPUs available, %(default)s here)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")


def parse_views(text: str | None) -> list[str] | None:
    if text is None:
        return None
    views = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [view for view in views if view not in ("CC", "MLO")]
    if not views or unknown:
        raise ValueError(f"--views {text!r} must list CC and/or MLO, separated by commas")
    return views


def records_from_arguments(args: argparse.Namespace) -> list[ImageRecord]:
    """Load the records named by the data arguments."""
    return load_records(
        args.data_format, args.data, views=parse_views(args.views), vindr_split=args.vindr_split
    )


def check_threads(value: int) -> int:
    if value < 1:
        raise ValueError(f"--threads must be at least 1, got {value}")
    return value


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that cut views into patches, shared by fit and crossval."""
    parser.add_argument(
        "--patch-resolution", type=int, default=512, help="view size in pixels for patches (default 512)"
    )
    parser.add_argument(
        "--patch-size", type=int, default=128, help="patch size in pixels, which sets the VAE's input size (default 128)"
    )
    parser.add_argument(
        "--patch-stride", type=int, default=None, help="grid stride in pixels of scored patches (default: half the patch size)"
    )
    parser.add_argument(
        "--min-coverage", type=float, default=0.5, help="minimum share of breast pixels in a patch (default 0.5)"
    )
    parser.add_argument(
        "--patches-per-view", type=int, default=DEFAULT_PATCHES_PER_VIEW,
        help=f"random training patches per view and epoch (default {DEFAULT_PATCHES_PER_VIEW})",
    )

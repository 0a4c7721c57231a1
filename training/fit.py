"""Train the VAE on the healthy images of the training patients.

Usage::

    python -m training.fit --data-format mini-mias --data data/mini-mias --out runs/mias
    torchrun --nproc_per_node=2 -m training.fit --data-format mini-mias --data data/mini-mias --out runs/ddp

Writes to ``--out``: ``split.json``, ``history.csv``, ``loss.png``, ``model.pt`` (the
epoch with the lowest validation loss, calibrated on the validation patients'
healthy images) and ``last.pt`` (the last epoch plus optimizer state, for
``--resume``). Under torchrun every process trains on its shard of each epoch
(gloo backend, CPU) and only rank 0 writes files.

``--resolution-policy patches`` trains the VAE on random breast patches of views
preprocessed at ``--patch-resolution`` pixels, new patches every epoch, as
``training.crossval`` does; the validation loss is taken on a fixed draw of patches
of the validation views. ``--score`` and the patch settings are stored in model.pt
(``score_name`` and ``training["scoring"]``), so the worker scores as trained.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model.checkpoint import Checkpoint, code_version, load_checkpoint
from model.preprocess import PREPROCESSING_VERSION
from model.scoring import RESOLUTION_POLICIES, SCORES, SCORING_KEY, THRESHOLD_RULES, ScoreSettings
from model.vae import PRESETS, VAE, VAEConfig, count_parameters, preset
from training.cache import CachedImages, cache_key, load_or_build_cache
from training.calibrate import calibrate, calibration_record_indices
from training.cli import (
    add_data_arguments,
    add_patch_arguments,
    check_threads,
    configure_logging,
    parse_views,
    records_from_arguments,
)
from training.crossval import PatchSampler
from training.data import DEFAULT_FRACTIONS, ImageRecord, PatientSplit, make_split, split_counts
from training.loop import (
    LossTotals,
    ResumeState,
    epoch_seed,
    evaluate_loss,
    load_last,
    read_checkpoint_dict,
    save_last,
    train_epoch,
    unwrap,
    write_checkpoint_dict,
)
from training.plots import plot_loss

logger = logging.getLogger(__name__)

# The configuration of the shipped checkpoint; 2 epochs on the mini-MIAS training
# normals take under a minute on 2 CPU cores without other load.
DEFAULT_PRESET = "latent4"
DEFAULT_WHOLE_SCORE = "global_mse"
# The score adopted by the cross-validated comparison in docs/detection.md.
DEFAULT_PATCH_SCORE = "contra_kl_mean"
# Seed offset of the fixed draw of validation patches, apart from the training draws.
VALIDATION_PATCH_SEED = 1_000_003
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_reconstruction",
    "train_kl",
    "validation_loss",
    "validation_reconstruction",
    "validation_kl",
    "seconds",
)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed() -> Distributed:
    """Join the torchrun process group (gloo) when launched by torchrun with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    dist.init_process_group(backend="gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train the VAE on healthy mammograms, then calibrate it on the validation patients.",
    )
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder for checkpoints, history and plots")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
        help=f"model.vae preset (default {DEFAULT_PRESET}, the shipped configuration: 2 epochs on mini-MIAS "
        "take under a minute on 2 idle CPU cores; 'seed' is the 51 M parameter reference)",
    )
    parser.add_argument("--latent-size", type=int, default=None, help="override the preset's latent size")
    parser.add_argument("--epochs", type=int, default=30, help="total epochs to train, including resumed ones (default 30)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per optimisation step and process (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    parser.add_argument("--beta", type=float, default=None, help="weight of the KL term (default: the preset's, 1.0)")
    parser.add_argument(
        "--reconstruction-loss", choices=("bce", "mse"), default=None,
        help="reconstruction term summed over pixels (default: the preset's, bce)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split, initial weights and sampling noise")
    parser.add_argument(
        "--validation-fraction", type=float, default=DEFAULT_FRACTIONS["validation"],
        help="share of patients held out for validation loss and calibration (default %(default)s)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=DEFAULT_FRACTIONS["test"],
        help="share of patients held out for training.evaluate (default %(default)s)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None,
        help="stop after the first epoch that ends past this many minutes of training (default: no limit)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from OUT/last.pt; the model configuration, split and seed come from that file",
    )
    parser.add_argument(
        "--threshold-rule", choices=THRESHOLD_RULES, default="specificity",
        help="default threshold rule stored with the calibration (default specificity)",
    )
    parser.add_argument(
        "--specificity", type=float, default=0.95, help="healthy quantile of the 'specificity' rule (default 0.95)"
    )
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    if args.score is None:
        args.score = DEFAULT_PATCH_SCORE if args.resolution_policy == "patches" else DEFAULT_WHOLE_SCORE
    if args.patch_stride is None:
        args.patch_stride = args.patch_size // 2
    for name in ("epochs", "batch_size", "patches_per_view", "patch_stride"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit}")
    try:
        score_settings_from_arguments(args)
    except ValueError as error:
        parser.error(f"invalid patch settings: {error}")
    return args


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--score", choices=sorted(SCORES), default=None,
        help=f"score stored in model.pt and calibrated (default {DEFAULT_WHOLE_SCORE} for whole views, "
        f"{DEFAULT_PATCH_SCORE} for patches)",
    )
    parser.add_argument(
        "--resolution-policy", choices=RESOLUTION_POLICIES, default="whole",
        help="'whole' (default): train and score views at the preset's input size; 'patches': train on "
        "random breast patches of views preprocessed at --patch-resolution, score them patch by patch",
    )
    add_patch_arguments(parser)


def score_settings_from_arguments(args: argparse.Namespace) -> ScoreSettings:
    if args.resolution_policy == "whole":
        return ScoreSettings(resolution_policy="whole")
    return ScoreSettings(
        resolution_policy="patches",
        patch_resolution=args.patch_resolution,
        patch_size=args.patch_size,
        patch_stride=args.patch_stride,
        min_coverage=args.min_coverage,
    )


def model_config_from_arguments(args: argparse.Namespace) -> VAEConfig:
    overrides: dict[str, Any] = {}
    if args.resolution_policy == "patches":
        overrides["input_size"] = args.patch_size
    if args.latent_size is not None:
        overrides["latent_size"] = args.latent_size
    if args.beta is not None:
        overrides["beta"] = args.beta
    if args.reconstruction_loss is not None:
        overrides["reconstruction_loss"] = args.reconstruction_loss
    return preset(args.preset, **overrides)


def git_commit() -> str | None:
    """Commit of the source tree, when it is a git checkout with git installed."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def machine_summary(threads: int, world_size: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus_available": os.cpu_count(),
        "threads": threads,
        "world_size": world_size,
        "torch": str(torch.__version__),
    }


@dataclass
class PreparedData:
    records: list[ImageRecord]
    split: PatientSplit
    cache: CachedImages
    train_images: np.ndarray
    validation_images: np.ndarray
    validation_indices: list[int]
    summary: dict[str, Any]


def prepare_data(
    args: argparse.Namespace, split: PatientSplit | None, cache_dir: Path, size: int, ranks: Distributed
) -> PreparedData:
    """Load records, fix the split and read the training and validation images from the cache.

    Rank 0 preprocesses on a cache miss while the other ranks wait, then read its cache.
    """
    if split is not None and split.data_format not in (None, args.data_format):
        raise ValueError(
            f"last.pt was trained on --data-format {split.data_format}, got {args.data_format}; resume with the same data"
        )
    records = records_from_arguments(args)
    if split is None:
        fractions = {
            "train": 1.0 - args.validation_fraction - args.test_fraction,
            "validation": args.validation_fraction,
            "test": args.test_fraction,
        }
        split = make_split(records, args.seed, fractions, data_format=args.data_format)

    if ranks.is_main:
        cache = load_or_build_cache(records, cache_dir, size=size, threads=args.threads)
    ranks.barrier()
    if not ranks.is_main:
        cache = load_or_build_cache(records, cache_dir, size=size, threads=1)

    train_images, train_indices = cache.select(split.select(records, "train", healthy_only=True))
    validation_indices = calibration_record_indices(records, split.to_dict(), "validation")
    validation_images, validation_indices = cache.select(validation_indices)
    if len(train_indices) == 0:
        raise ValueError("the training patients have no preprocessed healthy image; check --data and the fractions")
    if len(validation_indices) == 0:
        raise ValueError(
            "the validation patients have no preprocessed healthy image; raise --validation-fraction or add data"
        )

    counts = split_counts(split, records)
    summary = {
        "data_format": args.data_format,
        "data_name": Path(args.data).name,
        "views": parse_views(args.views),
        "vindr_split": args.vindr_split,
        "images": len(records),
        "patients": len({record.patient_id for record in records}),
        "healthy_images": sum(record.healthy for record in records),
        "abnormal_images": sum(not record.healthy for record in records),
        "rejected_by_preprocessing": len(cache.failures),
        "file_list_key": cache_key(records, size),
        "training_images": len(train_indices),
        "validation_images": len(validation_indices),
        "split_counts": counts,
    }
    logger.info(
        "split: %d/%d/%d patients; training on %d healthy images, validating on %d",
        counts["train"]["patients"],
        counts["validation"]["patients"],
        counts["test"]["patients"],
        len(train_indices),
        len(validation_indices),
    )
    return PreparedData(records, split, cache, train_images, validation_images, validation_indices, summary)


def make_loaders(
    data: PreparedData, batch_size: int, seed: int, ranks: Distributed
) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    """Training loader over this rank's shuffled shard and validation loader over its slice."""
    train_set = TensorDataset(torch.from_numpy(np.ascontiguousarray(data.train_images)).unsqueeze(1))
    sampler = DistributedSampler(
        train_set, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=seed, drop_last=False
    )
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    # Every validation image is seen exactly once across ranks, so summed totals are exact.
    validation = torch.from_numpy(np.ascontiguousarray(data.validation_images[ranks.rank :: ranks.world_size]))
    validation_loader = DataLoader(TensorDataset(validation.unsqueeze(1)), batch_size=batch_size * 2)
    return train_loader, sampler, validation_loader


def is_patch_training(settings: dict[str, Any]) -> bool:
    return ScoreSettings.from_dict(settings.get(SCORING_KEY)).resolution_policy == "patches"


@dataclass
class PatchTraining:
    """Random breast patches of the training views, drawn anew each epoch, and fixed validation patches.

    Each epoch's draw depends only on the seed and the epoch, so a resumed run draws
    the same patches as an uninterrupted one. Patch training runs in one process.
    """

    sampler: PatchSampler
    patches_per_view: int
    batch_size: int
    seed: int
    validation_loader: DataLoader

    @classmethod
    def create(cls, data: PreparedData, settings: dict[str, Any], batch_size: int) -> PatchTraining:
        scoring = ScoreSettings.from_dict(settings[SCORING_KEY])
        per_view = int(settings["patches_per_view"])
        seed = int(settings["seed"])
        validation_rng = np.random.default_rng(seed + VALIDATION_PATCH_SEED)
        validation = PatchSampler(data.validation_images, scoring).draw(per_view, validation_rng)
        validation_tensor = torch.from_numpy(np.ascontiguousarray(validation, dtype=np.float32)).unsqueeze(1)
        validation_loader = DataLoader(TensorDataset(validation_tensor), batch_size=batch_size * 2)
        return cls(PatchSampler(data.train_images, scoring), per_view, batch_size, seed, validation_loader)

    def loader(self, epoch: int) -> DataLoader:
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, 0))
        patches = self.sampler.draw(self.patches_per_view, rng)
        tensor = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).unsqueeze(1)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
        return DataLoader(TensorDataset(tensor), batch_size=self.batch_size, shuffle=True, generator=generator)


def history_row(epoch: int, train: LossTotals, validation: LossTotals, seconds: float) -> dict[str, float]:
    train_means, validation_means = train.means(), validation.means()
    return {
        "epoch": epoch,
        "train_loss": train_means["loss"],
        "train_reconstruction": train_means["reconstruction"],
        "train_kl": train_means["kl"],
        "validation_loss": validation_means["loss"],
        "validation_reconstruction": validation_means["reconstruction"],
        "validation_kl": validation_means["kl"],
        "seconds": seconds,
    }


def write_history(history: Sequence[dict[str, float]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({column: row[column] for column in HISTORY_COLUMNS})


def checkpoint_payload(
    model: VAE, data: PreparedData, training: dict[str, Any]
) -> dict[str, Any]:
    """Checkpoint dictionary of the current weights, without calibration."""
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict=state_dict,
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=None,
        data_summary=data.summary,
        split=data.split.to_dict(),
        training=training,
        code_version=code_version(),
        score_name=training.get("score", DEFAULT_WHOLE_SCORE),
    )
    return checkpoint.to_dict()


def train(
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: PreparedData,
    state: ResumeState,
    settings: dict[str, Any],
    ranks: Distributed,
) -> ResumeState:
    """Run the remaining epochs; rank 0 writes last.pt every epoch and model.pt on improvement."""
    patches = PatchTraining.create(data, settings, args.batch_size) if is_patch_training(settings) else None
    if patches is not None:
        train_loader, validation_loader = patches.loader(epoch=state.epoch + 1), patches.validation_loader
    else:
        train_loader, sampler, validation_loader = make_loaders(data, args.batch_size, settings["seed"], ranks)
    remaining = args.epochs - state.epoch
    progress = tqdm(
        total=remaining * len(train_loader), desc="training", unit="batch", disable=None if ranks.is_main else True
    )
    with progress, logging_redirect_tqdm():
        for epoch in range(state.epoch + 1, args.epochs + 1):
            started = time.perf_counter()
            if patches is not None:
                train_loader = patches.loader(epoch)
            else:
                sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(settings["seed"], epoch, ranks.rank))
            train_totals = train_epoch(model, train_loader, optimizer, progress).all_reduce()
            validation_totals = evaluate_loss(unwrap(model), validation_loader).all_reduce()
            seconds = time.perf_counter() - started

            row = history_row(epoch, train_totals, validation_totals, seconds)
            state.history.append(row)
            state.epoch = epoch
            state.elapsed_seconds += seconds
            improved = row["validation_loss"] < state.best_validation_loss
            if improved:
                state.best_validation_loss = row["validation_loss"]
                state.best_epoch = epoch
            logger.info(
                "epoch %d/%d: train loss %.2f (reconstruction %.2f, KL %.2f), validation loss %.2f, %.1f s%s",
                epoch,
                args.epochs,
                row["train_loss"],
                row["train_reconstruction"],
                row["train_kl"],
                row["validation_loss"],
                seconds,
                ", best so far" if improved else "",
            )
            if ranks.is_main:
                save_epoch(args.out, unwrap(model), optimizer, data, state, settings, improved)
            if time_limit_reached(state, args.time_limit, ranks):
                logger.info("stopping after epoch %d: the time limit of %g minutes is reached", epoch, args.time_limit)
                state.stopped_by_time_limit = True
                break
    return state


def time_limit_reached(state: ResumeState, minutes: float | None, ranks: Distributed) -> bool:
    """Rank 0's verdict on the time limit, broadcast so that every rank stops after the same epoch."""
    if minutes is None:
        return False
    verdict = torch.tensor([int(state.elapsed_seconds > minutes * 60)], dtype=torch.int64)
    if ranks.world_size > 1:
        dist.broadcast(verdict, src=0)
    return bool(verdict.item())


def training_record(settings: dict[str, Any], state: ResumeState) -> dict[str, Any]:
    return {
        **settings,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_validation_loss": state.best_validation_loss,
        "training_seconds": round(state.elapsed_seconds, 1),
        "stopped_by_time_limit": state.stopped_by_time_limit,
    }


def save_epoch(
    out: Path,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    data: PreparedData,
    state: ResumeState,
    settings: dict[str, Any],
    improved: bool,
) -> None:
    payload = checkpoint_payload(model, data, training_record(settings, state))
    if improved:
        write_checkpoint_dict(payload, out / "model.pt")
    state_copy = dataclasses.replace(state, optimizer_state=optimizer.state_dict(), history=list(state.history))
    save_last(payload, state_copy, out / "last.pt")
    write_history(state.history, out / "history.csv")


def finish(args: argparse.Namespace, data: PreparedData, state: ResumeState) -> None:
    """Calibrate model.pt on the validation patients' healthy images and plot the loss.

    model.pt also gets the totals of the whole run: its ``training["epochs"]`` is the
    epoch of its weights, ``epochs_trained`` the number of epochs run.
    """
    model_path = args.out / "model.pt"
    checkpoint = load_checkpoint(model_path)
    calibration = calibrate(
        checkpoint,
        data.cache,
        data.validation_indices,
        args.threshold_rule,
        args.specificity,
        args.threads,
        records=data.records,
    )
    payload = read_checkpoint_dict(model_path)
    payload["calibration"] = calibration
    payload["training"].update(
        epochs_trained=state.epoch,
        run_training_seconds=round(state.elapsed_seconds, 1),
        stopped_by_time_limit=state.stopped_by_time_limit,
    )
    write_checkpoint_dict(payload, model_path)
    write_history(state.history, args.out / "history.csv")
    plot_loss(state.history, args.out / "loss.png")
    logger.info(
        "wrote %s (epoch %d of %d, validation loss %.2f), last.pt, history.csv and loss.png in %.0f s of training",
        model_path,
        state.best_epoch,
        state.epoch,
        state.best_validation_loss,
        state.elapsed_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = setup_distributed()
    configure_logging(args.verbose, ranks.rank)
    try:
        run(args, ranks)
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()
    return 0


def run(args: argparse.Namespace, ranks: Distributed) -> None:
    threads = check_threads(args.threads)
    torch.set_num_threads(max(1, threads // ranks.world_size))
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or args.out / "cache"

    resumed: tuple[dict[str, Any], ResumeState] | None = None
    if args.resume:
        resumed = load_last(args.out / "last.pt")
        payload = resumed[0]
        config = VAEConfig.from_dict(payload["model_config"])
        split = PatientSplit.from_dict(payload["split"])
        settings = dict(payload["training"])
        for name in ("epochs", "best_epoch", "best_validation_loss", "training_seconds", "stopped_by_time_limit"):
            settings.pop(name, None)
        settings.update(lr=args.lr, batch_size=args.batch_size, machine=machine_summary(threads, ranks.world_size))
        logger.info("resuming from %s after epoch %d", args.out / "last.pt", resumed[1].epoch)
    else:
        config = model_config_from_arguments(args)
        split = None
        settings = {
            "preset": args.preset,
            "seed": args.seed,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "threshold_rule": args.threshold_rule,
            "specificity": args.specificity,
            "score": args.score,
            SCORING_KEY: score_settings_from_arguments(args).to_dict(),
            "git_commit": git_commit(),
            "machine": machine_summary(threads, ranks.world_size),
        }

    if args.resolution_policy == "patches" and resumed is None:
        settings["patches_per_view"] = args.patches_per_view
    if is_patch_training(settings) and ranks.world_size > 1:
        raise ValueError("patch training runs in one process; start it without torchrun")
    view_size = ScoreSettings.from_dict(settings.get(SCORING_KEY)).view_size(config.input_size)
    data = prepare_data(args, split, cache_dir, view_size, ranks)
    if ranks.is_main:
        data.split.write_json(args.out / "split.json", data.records)

    torch.manual_seed(settings["seed"])
    model = VAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if resumed is not None:
        model.load_state_dict(resumed[0]["state_dict"])
        optimizer.load_state_dict(resumed[1].optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        state = resumed[1]
        state.stopped_by_time_limit = False
    else:
        state = ResumeState(
            epoch=0, optimizer_state={}, best_validation_loss=math.inf, best_epoch=0, history=[], elapsed_seconds=0.0
        )
    logger.info("model: %s, %d parameters, %s", settings["preset"], count_parameters(model), config)
    wrapped: torch.nn.Module = DistributedDataParallel(model) if ranks.world_size > 1 else model

    if state.epoch >= args.epochs:
        logger.warning("last.pt already has %d epochs, not fewer than --epochs %d; only calibrating", state.epoch, args.epochs)
    else:
        state = train(args, wrapped, optimizer, data, state, settings, ranks)
    if ranks.is_main:
        finish(args, data, state)


if __name__ == "__main__":
    sys.exit(main())

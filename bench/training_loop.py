"""Training throughput: the cached loop of training.fit against re-reading every image each epoch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from bench.config import BenchConfig
from bench.report import Section, median, ratio, verdict
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.preprocess import OUTPUT_SIZE, PREPROCESSING_VERSION, preprocess_file
from model.vae import VAE, VAEConfig, elbo_loss, preset
from training.cache import default_threads, load_or_build_cache
from training.calibrate import calibrate, store_calibration
from training.data import ImageRecord, mias_records
from training.loop import train_epoch

logger = logging.getLogger(__name__)

BATCH_SIZE = 16  # training.fit's default --batch-size
LEARNING_RATE = 1e-3  # training.fit's default --lr
GOAL_RATIO = 3.0


class ReadEveryEpoch(Dataset):
    """Reads, preprocesses and resizes an image file on every access, as a loop without a cache would."""

    def __init__(self, records: list[ImageRecord]) -> None:
        self.records = records
        self.reads = 0
        self.seconds = 0.0  # spent in __getitem__ since the object was made

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        started = time.perf_counter()
        record = self.records[index]
        view = preprocess_file(record.path, laterality=record.laterality, view_position=record.view_position)
        self.reads += 1
        self.seconds += time.perf_counter() - started
        return torch.from_numpy(view.image).unsqueeze(0)


@dataclass
class LoopRate:
    images_per_second: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.images_per_second))


def time_epoch(model: VAE, loader: DataLoader, optimizer: torch.optim.Optimizer, images: int) -> float:
    """Images per second of one epoch of training.loop.train_epoch."""
    started = time.perf_counter()
    train_epoch(model, loader, optimizer)
    return images / (time.perf_counter() - started)


def training_flops_per_image(config_name: str) -> float:
    """FLOPs of one forward and backward pass with the ELBO loss, per image (torch's FlopCounterMode)."""
    torch.manual_seed(0)
    model = VAE(preset(config_name))
    model.train()
    images = torch.rand(BATCH_SIZE, 1, OUTPUT_SIZE, OUTPUT_SIZE)
    with FlopCounterMode(display=False) as counter:
        reconstruction, mu, logvar = model(images)
        loss, _, _ = elbo_loss(reconstruction, images, mu, logvar)
        loss.backward()
    return counter.get_total_flops() / BATCH_SIZE


def inference_flops_per_image(model_config: VAEConfig) -> float:
    """FLOPs of one eval-mode forward pass of a single image (torch's FlopCounterMode)."""
    model = VAE(model_config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 1, OUTPUT_SIZE, OUTPUT_SIZE))
    return float(counter.get_total_flops())


def matmul_flop_rate(threads: int, size: int, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a size x size matrix product with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        left, right = torch.rand(size, size), torch.rand(size, size)
        torch.mm(left, right)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(left, right)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / best


def healthy_records(config: BenchConfig) -> list[ImageRecord]:
    records = [record for record in mias_records(config.data_dir / "mini-mias") if record.healthy]
    return records[: config.training_images]


def measure_loops(
    config: BenchConfig, cache, records: list[ImageRecord], threads: int
) -> tuple[LoopRate, LoopRate, float, VAE]:
    """Train a fresh model with each loop for the configured epochs, on ``threads`` torch threads.

    Returns the two rates, the plain loop's reading time per image in ms, and the cached loop's model.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        count = len(cache.indices)
        torch.manual_seed(0)
        cached_model = VAE(preset(config.training_preset))
        cached_optimizer = torch.optim.Adam(cached_model.parameters(), lr=LEARNING_RATE)
        images = TensorDataset(torch.from_numpy(np.ascontiguousarray(cache.images)).unsqueeze(1))
        cached_loader = DataLoader(images, batch_size=BATCH_SIZE, shuffle=True)

        torch.manual_seed(0)
        plain_model = VAE(preset(config.training_preset))
        plain_optimizer = torch.optim.Adam(plain_model.parameters(), lr=LEARNING_RATE)
        reader = ReadEveryEpoch([records[index] for index in cache.indices])
        plain_loader = DataLoader(reader, batch_size=BATCH_SIZE, shuffle=True)

        # The loops take turns epoch by epoch, so that both see the same load on a shared machine.
        cached, plain = LoopRate([]), LoopRate([])
        for _ in range(config.training_epochs):
            cached.images_per_second.append(time_epoch(cached_model, cached_loader, cached_optimizer, count))
            plain.images_per_second.append(time_epoch(plain_model, plain_loader, plain_optimizer, count))
    finally:
        torch.set_num_threads(previous)
    return cached, plain, 1000.0 * reader.seconds / max(1, reader.reads), cached_model


def run(config: BenchConfig) -> Section:
    section = Section(
        "5. Training throughput",
        f"training.fit's cached loop at least {GOAL_RATIO:g}x the images per second of a loop that reads and "
        "resizes every image again each epoch; share of the FLOP-bound rate reported.",
    )
    # training.fit's --threads defaults to the usable cores; one thread is measured too
    # because on a loaded machine it can be the faster setting.
    default = default_threads()
    thread_counts = (default, 1) if default > 1 and not config.smoke else (default,)
    records = healthy_records(config)
    cache_dir = config.work_dir / "training-cache"

    started = time.perf_counter()
    cache = load_or_build_cache(records, cache_dir, size=OUTPUT_SIZE, threads=default)
    cache_seconds = time.perf_counter() - started
    count = len(cache.indices)
    flops_per_image = training_flops_per_image(config.training_preset)

    table = section.table(
        f"{count} healthy mini-MIAS films (1024 x 1024 PGM.gz), preset `{config.training_preset}`, batch {BATCH_SIZE}, "
        f"Adam, {config.training_epochs} epochs each, the two loops taking turns epoch by epoch, median over "
        "epochs; the matmul rate is measured with the same threads:",
        ["loop", "torch threads", "images/s", "epoch s", "read ms per image", "GFLOP/s reached", "share of matmul rate", "cached / plain"],
    )
    outcomes = {}
    trained_model = None
    for threads in thread_counts:
        cached, plain, read_ms, model = measure_loops(config, cache, records, threads)
        trained_model = trained_model or model
        peak = matmul_flop_rate(threads, config.matmul_size)
        speedup = ratio(cached.median, plain.median)
        outcomes[threads] = (cached, plain, peak, speedup, read_ms)
        for name, rate in (("training.fit (cached 128 x 128 array)", cached), ("plain (read and resize every epoch)", plain)):
            achieved = rate.median * flops_per_image
            table.add(
                name,
                threads,
                rate.median,
                count / rate.median,
                read_ms if rate is plain else None,
                achieved / 1e9,
                f"{100 * achieved / peak:.0f}%",
                f"{speedup:.1f}x" if rate is cached else "",
            )
    section.notes.append(
        f"The cache was built once in {cache_seconds:.1f} s ({count / cache_seconds:.0f} images/s with {default} "
        f"processes). One forward and backward pass costs {flops_per_image / 1e9:.2f} GFLOP per image "
        "(torch.utils.flop_counter.FlopCounterMode, convolutions and linear layers). The machine's float32 rate "
        f"is the best of 5 {config.matmul_size} x {config.matmul_size} torch.mm calls: "
        + ", ".join(f"{outcome[2] / 1e9:.0f} GFLOP/s on {threads} thread{'s' if threads > 1 else ''}" for threads, outcome in outcomes.items())
        + "."
    )

    cached, plain, peak, speedup, read_ms = outcomes[default]
    met = speedup is not None and speedup >= GOAL_RATIO
    step_ms = 1000.0 / cached.median
    shortfall = (
        f"by {GOAL_RATIO - speedup:.1f}x. Reading and preprocessing a film took {read_ms:.0f} ms (timed inside the "
        f"plain loop's dataset) against {step_ms:.0f} ms of training per image in the cached loop, which "
        f"predicts a ratio of about {1 + read_ms / step_ms:.1f}x. The cached loop reaches "
        f"{100 * cached.median * flops_per_image / peak:.0f}% of the matmul rate"
    )
    if 1 in outcomes and default != 1:
        shortfall += f"; with one torch thread the ratio is {outcomes[1][3]:.1f}x"
    section.verdict = verdict(
        met, f"cached loop {speedup:.1f}x the plain loop with training.fit's default {default} threads", f"at least {GOAL_RATIO:g}x", shortfall
    )
    config.results["training_speedup"] = speedup
    config.results["matmul_flop_rate"] = {threads: outcome[2] for threads, outcome in outcomes.items()}

    if config.checkpoint is None and not config.smoke and trained_model is not None:
        config.checkpoint = save_benchmark_checkpoint(config, trained_model, cache, len(records))
    return section


def save_benchmark_checkpoint(config: BenchConfig, model: VAE, cache, record_count: int) -> Path:
    """Save the briefly trained model with a calibration on its own training images.

    It replaces the shipped checkpoint while model/checkpoints/default.pt does not
    exist yet, so that scores and z-scores have realistic magnitudes.
    """
    path = config.work_dir / "bench-model.pt"
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict={name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=None,
        data_summary={"source": f"benchmark: {record_count} healthy mini-MIAS films, {config.training_epochs} epochs"},
    )
    save_checkpoint(checkpoint, path)
    calibration = calibrate(load_checkpoint(path), cache, list(cache.indices), threads=default_threads())
    store_calibration(path, calibration)
    logger.info("saved the benchmark checkpoint %s", path)
    return path

"""Inference: torch against ONNX Runtime, one and two threads, batches of one and four views."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.config import BenchConfig
from bench.report import Section, verdict
from bench.training_loop import inference_flops_per_image
from model.scoring import Scorer, ScoreSettings, grid_starts

GOAL_MS = 10.0
BACKENDS = ("torch", "onnxruntime")
THREADS = (1, 2)
BATCHES = (1, 4)
WARM_UP_CALLS = 2
ROUNDS = 2
PAUSE_S = 0.5


def model_runs_per_view(checkpoint) -> tuple[int, str]:
    """Model inputs per scored view: one for whole views, the patch grid's size for patch scoring."""
    settings = ScoreSettings.from_checkpoint(checkpoint)
    if settings.resolution_policy != "patches":
        return 1, "one model input per view"
    side = settings.view_size(checkpoint.model_config.input_size)
    count = len(grid_starts(side, settings.patch_size, settings.patch_stride)) ** 2
    return count, (
        f"up to {count} patches of {settings.patch_size} pixels per {side}-pixel view "
        "(patches with too little breast are skipped)"
    )


def time_batch(scorer: Scorer, images: np.ndarray) -> float:
    """Seconds per view of one Scorer.score_batch call: inference, error map and calibration lookup."""
    started = time.perf_counter()
    scorer.score_batch(images, ["L"] * len(images), ["MLO"] * len(images))
    return (time.perf_counter() - started) / len(images)


def run(config: BenchConfig) -> Section:
    section = Section(
        "3. Inference",
        f"at most {GOAL_MS:g} ms per view with the backend the worker serves with (the faster one).",
    )
    previous_threads = torch.get_num_threads()
    samples: dict[tuple[str, int, int], list[float]] = {}
    try:
        scorers = {
            (backend, threads): Scorer(config.checkpoint, backend=backend, threads=threads)
            for backend in reversed(BACKENDS)
            for threads in THREADS
        }
        size = next(iter(scorers.values())).view_size
        batches = {batch: np.random.default_rng(0).random((batch, size, size), dtype=np.float32) for batch in BATCHES}
        # Blocks of calls per configuration, repeated in ROUNDS rounds, so that a change of
        # load on a shared machine hits every configuration. ONNX Runtime runs first in each
        # round because torch's OpenMP threads keep spinning for a while after their last call.
        rounds = 1 if config.smoke else ROUNDS
        for _ in range(rounds):
            for (backend, threads), scorer in scorers.items():
                torch.set_num_threads(threads)
                for batch, images in batches.items():
                    for _ in range(WARM_UP_CALLS):
                        time_batch(scorer, images)
                    values = samples.setdefault((backend, threads, batch), [])
                    values.extend(time_batch(scorer, images) * 1000.0 for _ in range(config.inference_iterations // rounds))
                time.sleep(PAUSE_S)
    finally:
        torch.set_num_threads(previous_threads)
    results = {key: float(np.median(values)) for key, values in samples.items()}
    fastest = {key: float(np.percentile(values, 10)) for key, values in samples.items()}

    checkpoint = Scorer(config.checkpoint, backend="torch").checkpoint
    model_config = checkpoint.model_config
    runs, runs_text = model_runs_per_view(checkpoint)
    flops = inference_flops_per_image(model_config) * runs
    table = section.table(
        f"ms per view, median and 10th percentile of {config.inference_iterations} calls of Scorer.score_batch per "
        "configuration in blocks that take turns; model with "
        f"{model_config.initial_channels} initial channels and a {model_config.latent_size}-dimensional latent, "
        f"{runs_text}, {flops / 1e9:.2f} GFLOP per view at most (FlopCounterMode):",
        ["backend", "threads", "batch 1", "batch 1, 10th pct", "batch 4", "batch 4, 10th pct", "batch 1 against torch"],
    )
    for backend in BACKENDS:
        for threads in THREADS:
            table.add(
                backend,
                threads,
                results[(backend, threads, 1)],
                fastest[(backend, threads, 1)],
                results[(backend, threads, 4)],
                fastest[(backend, threads, 4)],
                f"{results[('torch', threads, 1)] / results[(backend, threads, 1)]:.1f}x faster"
                if backend != "torch"
                else "",
            )
    served = Scorer(config.checkpoint, threads=1).backend
    served_ms = results[(served, 1, 1)]
    section.notes.append(
        f"The worker serves with `{served}` (Scorer's default backend \"auto\" takes ONNX Runtime when it is "
        "installed) and one thread per processing thread (processing.torch_threads = 0 divides the cores "
        "among the processing threads), batch 1 because each view is scored as it arrives. ONNX Runtime runs "
        "with spinning turned off, which costs a little latency and saves CPU for the other thread."
    )
    rate = config.results.get("matmul_flop_rate", {}).get(1)
    if rate:
        bound_ms = 1000.0 * flops / rate
        section.notes.append(
            f"At the one-thread matmul rate measured in section 5 ({rate / 1e9:.0f} GFLOP/s), the model's "
            f"{flops / 1e9:.2f} GFLOP per view take {bound_ms:.1f} ms. ONNX Runtime's one-thread median is "
            f"{100 * bound_ms / results[('onnxruntime', 1, 1)]:.0f}% of that bound (its convolution kernels can beat "
            "a plain matmul). A ratio far below 100% means the time goes to per-call overhead and to the "
            "patch extraction, map assembly and score computation around the model, not to its arithmetic."
        )
    section.verdict = verdict(
        served_ms <= GOAL_MS,
        f"{served_ms:.1f} ms per view with {served}, 1 thread, batch 1",
        f"at most {GOAL_MS:g} ms",
        f"by {served_ms - GOAL_MS:.1f} ms",
    )
    config.results["inference_ms"] = served_ms
    return section

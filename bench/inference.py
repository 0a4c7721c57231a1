"""Inference: torch against ONNX Runtime, one and two threads, batches of one and four views."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.config import BenchConfig
from bench.report import Section, verdict
from bench.training_loop import inference_flops_per_image
from model.scoring import Scorer

GOAL_MS = 10.0
BACKENDS = ("torch", "onnxruntime")
THREADS = (1, 2)
BATCHES = (1, 4)
WARM_UP_CALLS = 2


def per_view_ms(scorer: Scorer, batch: int, iterations: int) -> float:
    """Median ms per view of Scorer.score_batch: inference, error map and calibration lookup."""
    images = np.random.default_rng(0).random((batch, 128, 128), dtype=np.float32)
    lateralities, views = ["L"] * batch, ["MLO"] * batch
    for _ in range(WARM_UP_CALLS):
        scorer.score_batch(images, lateralities, views)
    durations = []
    for _ in range(iterations):
        started = time.perf_counter()
        scorer.score_batch(images, lateralities, views)
        durations.append(time.perf_counter() - started)
    return float(np.median(durations)) * 1000.0 / batch


def run(config: BenchConfig) -> Section:
    section = Section(
        "3. Inference",
        f"at most {GOAL_MS:g} ms per view with the backend the worker serves with (the faster one).",
    )
    previous_threads = torch.get_num_threads()
    results: dict[tuple[str, int, int], float] = {}
    try:
        for backend in BACKENDS:
            for threads in THREADS:
                scorer = Scorer(config.checkpoint, backend=backend, threads=threads)
                for batch in BATCHES:
                    results[(backend, threads, batch)] = per_view_ms(scorer, batch, config.inference_iterations)
    finally:
        torch.set_num_threads(previous_threads)

    model_config = Scorer(config.checkpoint, backend="torch").checkpoint.model_config
    table = section.table(
        f"ms per view, median of {config.inference_iterations} calls of Scorer.score_batch; model with "
        f"{model_config.initial_channels} initial channels and a {model_config.latent_size}-dimensional latent, "
        f"{inference_flops_per_image(model_config) / 1e9:.2f} GFLOP per view:",
        ["backend", "threads", "batch 1", "batch 4", "batch 1 relative to torch"],
    )
    for backend in BACKENDS:
        for threads in THREADS:
            table.add(
                backend,
                threads,
                results[(backend, threads, 1)],
                results[(backend, threads, 4)],
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
    section.verdict = verdict(
        served_ms <= GOAL_MS,
        f"{served_ms:.1f} ms per view with {served}, 1 thread, batch 1",
        f"at most {GOAL_MS:g} ms",
        f"by {served_ms - GOAL_MS:.1f} ms",
    )
    config.results["inference_ms"] = served_ms
    return section

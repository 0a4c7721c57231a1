"""Settings of one benchmark run: full or smoke sizes, folders, and values shared between benchmarks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.images import FULL_FIELD_SHAPE

# Smoke runs use views of this shape: big enough to be decoded at reduced resolution.
SMOKE_SHAPE = (1024, 832)


@dataclass
class BenchConfig:
    smoke: bool
    work_dir: Path  # temporary files of this run
    image_dir: Path  # generated test studies, kept between runs
    data_dir: Path  # the real data: mini-mias/ and dicom-mg/
    checkpoint: Path | None = None  # None until the training benchmark saves one
    results: dict[str, Any] = field(default_factory=dict)  # figures for the summary

    @property
    def shape(self) -> tuple[int, int]:
        return SMOKE_SHAPE if self.smoke else FULL_FIELD_SHAPE

    @property
    def ingest_repeats(self) -> int:
        return 1 if self.smoke else 5

    @property
    def decode_repeats(self) -> int:
        return 1 if self.smoke else 3

    @property
    def latency_repeats(self) -> int:
        return 1 if self.smoke else 5

    @property
    def inference_iterations(self) -> int:
        return 2 if self.smoke else 40

    @property
    def timed_views(self) -> int:
        """Views of each study that the decode and latency benchmarks time."""
        return 1 if self.smoke else 4

    @property
    def settle_s(self) -> float:
        """Pause before each timed send, after the worker is idle."""
        return 0.2 if self.smoke else 1.0

    @property
    def matmul_size(self) -> int:
        return 256 if self.smoke else 2048

    @property
    def training_images(self) -> int:
        return 4 if self.smoke else 64

    @property
    def training_epochs(self) -> int:
        return 1 if self.smoke else 3

    @property
    def training_preset(self) -> str:
        # latent16 is training.fit's default preset.
        return "tiny" if self.smoke else "latent16"

    @property
    def memory_associations(self) -> int:
        return 4


def default_data_dir() -> Path:
    repo_root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("MAMMO_DATA_DIR", repo_root / ".." / "shared" / "data")).resolve()

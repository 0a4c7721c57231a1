"""Fixtures shared by the test modules."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_factory  # noqa: E402

from model.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from model.preprocess import PREPROCESSING_VERSION  # noqa: E402
from model.scoring import build_calibration  # noqa: E402
from model.vae import VAE, preset  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder (``MAMMO_DATA_DIR``); the suite needs it and fails without it."""
    root = dicom_factory.data_dir()
    if not (root / "mini-mias" / "Info.txt").is_file() or not (root / "dicom-mg").is_dir():
        pytest.fail(f"real data not found under {root}; set MAMMO_DATA_DIR to the folder holding mini-mias/ and dicom-mg/")
    return root


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``tiny`` VAE with a made-up calibration: fast to load, deterministic."""
    torch.manual_seed(0)
    model = VAE(preset("tiny"))
    scores = [0.01 + 0.001 * i for i in range(40)]
    groups = ["L-CC", "R-CC", "L-MLO", "R-MLO"] * 10
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict=model.state_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=build_calibration(scores, groups),
        data_summary={"source": "untrained test model"},
    )
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("checkpoint") / "tiny.pt")

"""A worker with a patch checkpoint whose score compares the two breasts (contra_kl_mean).

The checkpoint is an untrained tiny VAE with patch settings and a made-up calibration of
the pairwise score, so the tests check the wiring rather than the detection. They cover
preprocessing at 512 pixels, per-view values stored at once, z-scores once the other
breast's view is scored, and the warning on a view whose partner never arrives.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from model.checkpoint import Checkpoint, save_checkpoint
from model.preprocess import PREPROCESSING_VERSION
from model.scoring import ScoreSettings, build_calibration, statistics_for
from model.vae import VAE, preset
from worker import pairs
from worker.db import open_database
from worker.serve import Worker
from worker_support import (
    four_view_study,
    running_worker,
    send,
    single_view,
    wait_for_results,
    worker_settings,
)

PAIRWISE_SCORE = "contra_kl_mean"


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def patch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny VAE on 128-pixel patches of 512-pixel views, scoring contra_kl_mean."""
    torch.manual_seed(0)
    model = VAE(preset("tiny", latent_size=16))
    differences = [-0.02 + 0.001 * i for i in range(40)]
    groups = ["L-CC", "R-CC", "L-MLO", "R-MLO"] * 10
    scoring = ScoreSettings(resolution_policy="patches", patch_resolution=512, patch_size=128, patch_stride=64)
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict=model.state_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=build_calibration(differences, groups, score_name=PAIRWISE_SCORE),
        data_summary={"source": "untrained test model"},
        training={"scoring": scoring.to_dict()},
        score_name=PAIRWISE_SCORE,
    )
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("patch-checkpoint") / "patch.pt")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, patch_checkpoint: Path) -> Iterator[Worker]:
    data_dir = tmp_path_factory.mktemp("pairs") / "data"
    with running_worker(worker_settings(data_dir, unused_port(), patch_checkpoint)) as running:
        yield running


def test_patch_worker_views_at_512(worker: Worker) -> None:
    assert worker.scorer.view_size == 512
    assert worker.scorer.pairwise


def test_four_views_judged_in_pairs(worker: Worker) -> None:
    datasets = four_view_study("pairs-four-views")
    study_uid = datasets[0].StudyInstanceUID
    assert send(worker.port, datasets) == [0x0000] * 4
    results = wait_for_results(worker.data_dir, 4, study=study_uid)
    assert [result.status for result in results] == ["scored"] * 4

    by_view = {(result.laterality, result.view_position): result for result in results}
    calibration = worker.scorer.checkpoint.calibration
    for (laterality, view_position), result in by_view.items():
        partner = by_view[(pairs.OTHER_SIDE[laterality], view_position)]
        assert result.score_name == PAIRWISE_SCORE
        assert result.global_error is not None
        assert result.global_error >= 0.0
        assert result.reconstruction_error is not None
        assert result.anomalous is not None
        assert result.z_score is not None
        assert not any(line.startswith(pairs.MISSING_PAIR_PREFIX) for line in (result.warnings or "").split("\n"))

        difference = result.reconstruction_error - partner.reconstruction_error
        _, stats = statistics_for(calibration, f"{laterality}-{view_position}")
        assert result.z_score == pytest.approx((difference - stats["mean"]) / stats["std"], rel=1e-6, abs=1e-9)
        assert result.anomalous == (difference > result.threshold)


def test_patch_secondary_capture_panels(worker: Worker) -> None:
    datasets = four_view_study("pairs-secondary-capture")
    assert send(worker.port, datasets[:1]) == [0x0000]
    (result,) = wait_for_results(worker.data_dir, 1, study=datasets[0].StudyInstanceUID)
    assert result.sc_path is not None, result.warnings
    sc = pydicom.dcmread(worker.data_dir / result.sc_path)
    # Three panels of 128 pixels shown 3 times larger, with 8-pixel margins.
    assert sc.Columns == 3 * 128 * 3 + 4 * 8
    assert "per-view score" in sc.ImageComments
    assert PAIRWISE_SCORE in sc.ImageComments


def test_lone_view_keeps_missing_pair(worker: Worker) -> None:
    lone = single_view("pairs-lone-view")
    assert send(worker.port, [lone]) == [0x0000]
    (result,) = wait_for_results(worker.data_dir, 1, study=lone.StudyInstanceUID)
    assert result.status == "scored", result.reason
    assert result.reconstruction_error is not None
    assert result.anomalous is None
    assert result.z_score is None
    assert result.warnings is not None
    assert "other breast's view (R MLO) of this study is missing" in result.warnings


def test_old_database_gains_columns(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE view_results (id INTEGER PRIMARY KEY, reconstruction_error FLOAT)")
    open_database(path)[0].dispose()
    with sqlite3.connect(path) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(view_results)")}
    assert "global_error" in columns
    assert "score_name" in columns


def test_display_downscale_averages() -> None:
    from worker.export import downscale

    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert downscale(image, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]

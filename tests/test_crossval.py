"""Cross-validation: folds by patient, patch extraction, score functions and a CLI smoke run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.crossval import inner_roles, partner_indices, patient_folds
from training.crossval_metrics import rank_auroc
from training.data import load_records
from model.scoring import (
    SCORES,
    Scorer,
    ScoreSettings,
    assemble_map,
    breast_mask,
    coverage_map,
    extract_patches,
    kl_divergence,
    patch_grid,
    score_definition,
    view_maps,
)
from training.patches import candidate_positions, patch_value_map, top_k_mean
from training.scores import LinearFit, contralateral, mahalanobis

REPOSITORY = Path(__file__).resolve().parent.parent


def synthetic_breast(size: int = 256) -> np.ndarray:
    """A bright half-disc against the left edge on a dark background, like an oriented view."""
    rows, columns = np.mgrid[0:size, 0:size]
    inside = (rows - size / 2) ** 2 + columns**2 < (0.4 * size) ** 2
    return np.where(inside, 0.6, 0.02).astype(np.float32)


# --------------------------------------------------------------------------- folds


@pytest.fixture(scope="module")
def mias_records(data_dir: Path):
    return load_records("mini-mias", data_dir / "mini-mias")


def test_folds_keep_patients_together(mias_records):
    fold_of = patient_folds(mias_records, 5, seed=7)
    folds_of_patient: dict[str, set[int]] = {}
    for record, fold in zip(mias_records, fold_of):
        folds_of_patient.setdefault(record.patient_id, set()).add(int(fold))
    assert all(len(folds) == 1 for folds in folds_of_patient.values())
    assert set(fold_of.tolist()) == {0, 1, 2, 3, 4}


def test_folds_hold_both_labels(mias_records):
    fold_of = patient_folds(mias_records, 5, seed=7)
    for fold in range(5):
        labels = {record.healthy for record, member in zip(mias_records, fold_of == fold) if member}
        assert labels == {True, False}


def test_folds_depend_on_seed(mias_records):
    assert not np.array_equal(patient_folds(mias_records, 5, seed=7), patient_folds(mias_records, 5, seed=11))


def test_inner_roles_hold_out_patients(mias_records):
    fold_of = patient_folds(mias_records, 5, seed=7)
    roles = inner_roles(mias_records, fold_of, 0, 0.25, seed=7)
    assert set(roles[fold_of == 0]) == {"test"}
    trained = {mias_records[index].patient_id for index in np.flatnonzero(roles == "train")}
    held_out = {mias_records[index].patient_id for index in np.flatnonzero(roles == "reference")}
    assert not trained & held_out
    assert all(mias_records[index].healthy for index in np.flatnonzero(roles == "train"))
    assert all(not mias_records[index].healthy for index in np.flatnonzero(roles == "unused"))


def test_partners_are_other_breast(mias_records):
    partners = partner_indices(mias_records)
    assert (partners >= 0).all()
    for index, partner in enumerate(partners):
        assert mias_records[partner].patient_id == mias_records[index].patient_id
        assert mias_records[partner].laterality != mias_records[index].laterality


# --------------------------------------------------------------------------- patches


def test_breast_mask_finds_disc():
    image = synthetic_breast()
    mask = breast_mask(image)
    truth = image > 0.3
    # Smoothing before the threshold widens the mask by a pixel or two at the skin line.
    assert (mask & truth).sum() / truth.sum() > 0.99
    assert (mask & truth).sum() / mask.sum() > 0.9


def test_breast_mask_empty_view():
    assert not breast_mask(np.zeros((128, 128), dtype=np.float32)).any()


def test_coverage_map_values():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True
    coverage = coverage_map(mask, 4)
    assert coverage.shape == (5, 5)
    assert coverage[0, 0] == 1.0
    assert coverage[4, 4] == 0.0
    assert coverage[2, 2] == pytest.approx(0.25)


def test_patch_grid_shapes_and_coverage():
    image = synthetic_breast(512)
    mask = breast_mask(image)
    positions = patch_grid(mask, 128, 64, min_coverage=0.5)
    assert positions.ndim == 2
    assert positions.shape[1] == 2
    assert (positions >= 0).all()
    assert (positions <= 512 - 128).all()
    patches = extract_patches(image, positions, 128)
    assert patches.shape == (len(positions), 128, 128)
    covered = np.zeros(mask.shape, dtype=bool)
    for row, column in positions:
        covered[row : row + 128, column : column + 128] = True
    assert (covered & mask).sum() / mask.sum() > 0.9


def test_patch_grid_reaches_far_edge():
    mask = np.ones((300, 300), dtype=bool)
    positions = patch_grid(mask, 128, 64)
    assert positions[:, 0].max() == 300 - 128
    assert positions[:, 1].max() == 300 - 128


def test_patch_grid_keeps_one_patch_without_breast():
    mask = np.zeros((256, 256), dtype=bool)
    mask[0, 0] = True
    assert len(patch_grid(mask, 128, 64, min_coverage=0.5)) == 1


def test_candidate_positions_inside_breast():
    image = synthetic_breast(512)
    mask = breast_mask(image)
    candidates = candidate_positions(mask, 128, 0.5)
    coverage = coverage_map(mask, 128)
    assert len(candidates) > 10
    assert (coverage[candidates[:, 0], candidates[:, 1]] >= 0.5).all()


def test_assemble_map_averages_overlaps():
    positions = np.array([[0, 0], [0, 2]])
    maps = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]).astype(np.float32)
    result = assemble_map(maps, positions, (6, 8))
    assert result[0, 0] == 1.0
    assert result[0, 2] == 2.0
    assert result[0, 5] == 3.0
    assert np.isnan(result[5, 0])
    assert np.isnan(result[0, 7])


def test_patch_value_map_spreads_values():
    result = patch_value_map(np.array([2.0]), np.array([[1, 1]]), (4, 4), 2)
    assert result[1, 1] == 2.0
    assert result[2, 2] == 2.0
    assert np.isnan(result[0, 0])


# --------------------------------------------------------------------------- scores


def test_top_k_mean():
    assert top_k_mean(np.array([1.0, 5.0, 3.0, 4.0]), 2) == 4.5
    assert top_k_mean(np.array([2.0]), 3) == 2.0


def test_kl_zero_for_prior():
    assert kl_divergence(np.zeros((2, 4)), np.zeros((2, 4))).tolist() == [0.0, 0.0]
    assert kl_divergence(np.ones((1, 4)), np.zeros((1, 4)))[0] == pytest.approx(2.0)
    assert kl_divergence(np.zeros((1, 1)), np.log(np.full((1, 1), 4.0)))[0] == pytest.approx(0.5 * (4.0 - 1.0 - np.log(4.0)))


def test_linear_fit_removes_density_trend():
    density = np.linspace(0.2, 0.8, 20)
    noise = np.tile([0.01, -0.01], 10)
    fit = LinearFit.fit(density, 2.0 * density + 1.0 + noise)
    assert fit.coefficients[0] == pytest.approx(2.0, abs=0.05)
    standardized = fit.standardize(np.array([0.5]), np.array([2.0 + 0.05]))
    assert standardized[0] == pytest.approx(0.05 / fit.residual_std, rel=0.05)


def test_mahalanobis_with_identity_is_euclidean():
    distances = mahalanobis(np.array([[3.0, 4.0], [0.0, 0.0]]), np.zeros(2), np.eye(2))
    assert distances.tolist() == pytest.approx([5.0, 0.0])


def test_contralateral_subtracts_partner():
    table = {"global_mse": np.array([1.0, 3.0, 5.0])}
    result = contralateral(table, np.array([1, 0, -1]))
    assert result["contra_global_mse"][:2].tolist() == [-2.0, 2.0]
    assert np.isnan(result["contra_global_mse"][2])


def test_rank_auroc_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = (rng.random((5, 40)) < 0.4).astype(np.int64)
    scores = np.round(rng.random((5, 40)), 1)  # rounded to create ties
    expected = [roc_auc_score(row_labels, row_scores) for row_labels, row_scores in zip(labels, scores)]
    assert rank_auroc(labels, scores).tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------- CLI


def test_crossval_smoke_run(data_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "training.crossval",
        "--data-format", "mini-mias", "--data", str(data_dir / "mini-mias"),
        "--max-views", "16", "--folds", "2", "--preset", "tiny", "--epochs", "1",
        "--patch-resolution", "256", "--patches-per-view", "2",
        "--score", "global_mse", "breast_mse", "contra_residual_max",
        "--bootstrap", "20", "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPOSITORY, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]

    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"data", "folds", "scores", "primary_score", "inner_selection", "bootstrap", "config"} <= set(result)
    assert set(result["scores"]) == {"global_mse", "breast_mse", "contra_residual_max"}
    metrics = result["scores"]["global_mse"]
    for key in (
        "auroc_mean", "auroc_mean_ci95", "auprc_mean", "auroc_folds", "auroc_folds_ci95", "auprc_folds",
        "auroc_pooled", "auroc_pooled_ci95", "auprc_pooled", "auroc_per_class", "auroc_masses", "threshold",
    ):
        assert key in metrics
    assert len(metrics["auroc_folds"]) == 2
    assert {"sensitivity", "specificity", "target_specificity"} <= set(metrics["threshold"])

    with open(out / "scores.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    test_folds: dict[str, set[str]] = {}
    for row in rows:
        if row["role"] == "test":
            test_folds.setdefault(row["patient_id"], set()).add(row["fold"])
    assert len(test_folds) == 8
    assert all(len(folds) == 1 for folds in test_folds.values())
    for name in ("result.json", "roc.png", "maps-global_mse.png"):
        assert (out / name).is_file()


# --------------------------------------------------------------------------- score registry


def perfect_run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model run that reconstructs its inputs exactly with a posterior equal to the prior."""
    return batch.copy(), np.zeros(len(batch))


def blank_run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model run that reconstructs black images, with KL 1 for every input."""
    return np.zeros_like(batch), np.ones(len(batch))


def test_registry_has_global_and_contra_scores():
    assert {"global_mse", "breast_mse", "residual_p99", "kl_mean", "contra_kl_mean", "contra_residual_p99"} <= set(SCORES)
    assert SCORES["contra_residual_p99"].pairwise
    assert SCORES["contra_residual_p99"].view_score_name == "residual_p99"
    assert not SCORES["global_mse"].pairwise


def test_unknown_score_name_raises():
    with pytest.raises(ValueError, match="not registered"):
        score_definition("no_such_score")


def test_perfect_reconstruction_scores_zero():
    image = synthetic_breast(128)
    maps = view_maps(perfect_run, image, ScoreSettings())
    for name in ("global_mse", "breast_mse", "residual_p99", "residual_max", "kl_mean"):
        value, score_map = SCORES[name].summarize(maps)
        assert value == 0.0
        assert score_map.shape == image.shape


def test_blank_reconstruction_scores_known_values():
    image = synthetic_breast(128)
    maps = view_maps(blank_run, image, ScoreSettings())
    mask = breast_mask(image)
    assert SCORES["global_mse"].summarize(maps)[0] == pytest.approx(float((image**2).mean()), rel=1e-5)
    assert SCORES["breast_mse"].summarize(maps)[0] == pytest.approx(float((image[mask] ** 2).mean()), rel=1e-5)
    # Deep inside the half-disc the smoothed residual is the view itself, 0.6.
    assert SCORES["residual_max"].summarize(maps)[0] == pytest.approx(0.6, abs=1e-3)
    assert SCORES["kl_mean"].summarize(maps)[0] == 1.0


def test_residual_ignores_dark_lesion():
    image = synthetic_breast(128)
    darker = image.copy()
    darker[60:70, 10:20] = 0.3
    maps = view_maps(lambda batch: (np.broadcast_to(image, batch.shape).copy(), np.zeros(len(batch))), darker, ScoreSettings())
    assert SCORES["residual_max"].summarize(maps)[0] == 0.0
    assert SCORES["breast_mse"].summarize(maps)[0] > 0.0


def test_patch_maps_cover_breast():
    image = synthetic_breast(512)
    settings = ScoreSettings(resolution_policy="patches", patch_resolution=512, patch_size=128, patch_stride=64)
    calls = []

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(batch.shape)
        return batch.copy(), np.arange(len(batch), dtype=np.float64)

    maps = view_maps(run, image, settings)
    assert calls == [(len(maps.patch_positions), 128, 128)]
    assert maps.reconstruction.shape == (512, 512)
    assert np.array_equal(maps.reconstruction, image)
    assert maps.mask.sum() / breast_mask(image).sum() > 0.9
    assert SCORES["residual_p99"].summarize(maps)[0] == 0.0
    assert SCORES["kl_mean"].summarize(maps)[0] == pytest.approx((len(maps.patch_positions) - 1) / 2)


def test_patch_maps_reject_wrong_size():
    settings = ScoreSettings(resolution_policy="patches", patch_resolution=512)
    with pytest.raises(ValueError, match="preprocess at that size"):
        view_maps(perfect_run, synthetic_breast(256), settings)


def test_score_settings_validation():
    with pytest.raises(ValueError, match="resolution_policy"):
        ScoreSettings(resolution_policy="tiles")
    with pytest.raises(ValueError, match="exceeds"):
        ScoreSettings(resolution_policy="patches", patch_resolution=64, patch_size=128)
    with pytest.raises(ValueError, match="unknown scoring settings"):
        ScoreSettings.from_dict({"patch_sise": 128})
    assert ScoreSettings(resolution_policy="patches", patch_resolution=1024).view_size(128) == 1024
    assert ScoreSettings().view_size(128) == 128


def patch_checkpoint(score_name: str, tmp_path: Path) -> Path:
    """An untrained tiny VAE that scores 128-pixel patches of 256-pixel views with ``score_name``."""
    import torch

    from model.checkpoint import Checkpoint, save_checkpoint
    from model.preprocess import PREPROCESSING_VERSION
    from model.scoring import build_calibration
    from model.vae import VAE, preset

    torch.manual_seed(0)
    model = VAE(preset("tiny"))
    settings = ScoreSettings(resolution_policy="patches", patch_resolution=256, patch_size=128, patch_stride=64)
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict=model.state_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=build_calibration([-0.02, -0.01, 0.0, 0.01, 0.02] * 4, ["L-MLO", "R-MLO"] * 10, score_name),
        training={"scoring": settings.to_dict()},
        score_name=score_name,
    )
    return save_checkpoint(checkpoint, tmp_path / f"{score_name}.pt")


def test_scorer_patch_score_matches_maps(tmp_path: Path):
    scorer = Scorer(patch_checkpoint("residual_p99", tmp_path), backend="torch", threads=1)
    assert scorer.view_size == 256
    assert not scorer.pairwise
    image = synthetic_breast(256)
    score = scorer.score(image, "L", "MLO")
    expected, expected_map = SCORES["residual_p99"].summarize(scorer.view_maps(image))
    assert score.reconstruction_error == pytest.approx(expected)
    assert score.error_map.shape == (256, 256)
    assert np.array_equal(score.score_map, expected_map)
    assert score.threshold is not None
    assert scorer.score_values(image[None])[0] == pytest.approx(expected)


def test_scorer_contra_judges_difference(tmp_path: Path):
    scorer = Scorer(patch_checkpoint("contra_residual_p99", tmp_path), backend="torch", threads=1)
    assert scorer.pairwise
    left = synthetic_breast(256)
    right = left.copy()
    right[100:140, 20:60] += 0.3
    own = scorer.score(right, "R", "MLO")
    partner = scorer.score(left, "L", "MLO")
    assert own.threshold is None
    assert own.anomalous is None
    judged = scorer.judge_pair(own, partner, "R", "MLO")
    assert judged.reconstruction_error == pytest.approx(own.reconstruction_error - partner.reconstruction_error)
    assert judged.threshold is not None
    assert judged.anomalous == (judged.reconstruction_error > judged.threshold)


def test_judge_pair_rejects_per_view_score(tiny_checkpoint: Path):
    scorer = Scorer(tiny_checkpoint, backend="torch", threads=1)
    image = np.zeros((128, 128), dtype=np.float32)
    score = scorer.score(image, "L", "MLO")
    with pytest.raises(ValueError, match="judge_pair"):
        scorer.judge_pair(score, score)


def test_crossval_features_match_scorer(tmp_path: Path):
    """Cross-validation summarises views with the same registered functions the worker's Scorer runs."""
    from model.checkpoint import load_checkpoint
    from training.scores import patch_features

    path = patch_checkpoint("kl_mean", tmp_path)
    checkpoint = load_checkpoint(path)
    settings = ScoreSettings.from_checkpoint(checkpoint)
    images = np.stack([synthetic_breast(256), synthetic_breast(256) * 0.8])
    features = patch_features(checkpoint.build_model(), images, settings)
    for name in ("kl_mean", "residual_p99", "global_mse", "breast_mse"):
        checkpoint.score_name = name
        expected = Scorer(checkpoint, backend="torch", threads=1).score_values(images)
        assert [view.values[name] for view in features] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-9)


def test_scorer_kl_same_with_onnxruntime(tmp_path: Path):
    path = patch_checkpoint("kl_mean", tmp_path)
    images = synthetic_breast(256)[None]
    by_torch = Scorer(path, backend="torch", threads=1).score_values(images)
    by_onnxruntime = Scorer(path, backend="onnxruntime", threads=1).score_values(images)
    assert by_onnxruntime.tolist() == pytest.approx(by_torch.tolist(), rel=1e-4)

"""Tests of the VAE, its loss, checkpoints, calibration and the scorer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint, default_checkpoint_path, file_sha256, load_checkpoint, save_checkpoint
from model.preprocess import PREPROCESSING_VERSION
from model.scoring import (
    MIN_GROUP_COUNT,
    Scorer,
    build_calibration,
    calibration_group,
    statistics_for,
    threshold_for,
    z_score,
)
from model.vae import PRESETS, VAE, VAEConfig, count_parameters, elbo_loss, error_map, preset
from training.sample import draw_samples

# Parameters of each preset: the convolutions have 775,425 and the three linear layers
# 3 * 16384 * latent + 2 * latent + 16384 for the 256 x 8 x 8 feature map.
PRESET_PARAMETERS = {
    "seed": 51_125_505,
    "latent128": 7_083_521,
    "latent64": 3_937_665,
    "latent16": 1_578_273,
    "latent4": 988_425,
    "tiny": 249_441,
}
SHIPPED_LIMIT_BYTES = 25 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name: str) -> None:
    assert count_parameters(VAE(preset(name))) == PRESET_PARAMETERS[name]


@pytest.mark.parametrize("name", ["tiny", "latent4", "latent64"])
def test_preset_output_shapes(name: str) -> None:
    config = preset(name)
    model = VAE(config).eval()
    with torch.no_grad():
        reconstruction, mu, logvar = model(torch.rand(3, 1, 128, 128))
    assert reconstruction.shape == (3, 1, 128, 128)
    assert mu.shape == (3, config.latent_size)
    assert logvar.shape == (3, config.latent_size)
    assert float(reconstruction.min()) >= 0.0
    assert float(reconstruction.max()) <= 1.0


def test_preset_overrides() -> None:
    config = preset("latent16", latent_size=32, beta=0.5)
    assert (config.latent_size, config.beta, config.initial_channels) == (32, 0.5, 32)
    with pytest.raises(ValueError, match="accepted presets"):
        preset("huge")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"input_size": 100}, "divisible"),
        ({"latent_size": 0}, "positive integer"),
        ({"beta": -1.0}, "beta"),
        ({"reconstruction_loss": "l1"}, "reconstruction_loss"),
    ],
)
def test_config_rejects_invalid_values(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**values)


def test_config_dict_round_trip() -> None:
    config = preset("tiny")
    assert VAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown VAEConfig keys"):
        VAEConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    model = VAE(preset("tiny"))
    images = torch.rand(2, 1, 128, 128)
    model.eval()
    first, mu, _ = model(images)
    second, _, _ = model(images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, model.decode(mu), rtol=0, atol=0)


def test_train_mode_samples_latent() -> None:
    torch.manual_seed(0)
    model = VAE(preset("tiny")).train()
    images = torch.rand(2, 1, 128, 128)
    first, _, _ = model(images)
    second, _, _ = model(images)
    assert not torch.equal(first, second)


def test_loss_bce_half_grey() -> None:
    # BCE of 0.5 against 0.5 is ln 2 per pixel; mu = 0, logvar = 0 gives KL = 0.
    target = torch.full((2, 1, 128, 128), 0.5)
    zeros = torch.zeros(2, 16)
    loss, recon, kl = elbo_loss(target.clone(), target, zeros, zeros)
    assert float(recon) == pytest.approx(128 * 128 * math.log(2), rel=1e-5)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(float(recon), rel=1e-6)


def test_loss_kl_and_beta() -> None:
    # With mu = 1 and logvar = 0 the KL term is 0.5 per latent dimension.
    target = torch.rand(4, 1, 128, 128)
    mu = torch.ones(4, 16)
    logvar = torch.zeros(4, 16)
    loss, recon, kl = elbo_loss(target, target, mu, logvar, beta=2.0, reconstruction_loss="mse")
    assert float(recon) == 0.0
    assert float(kl) == pytest.approx(8.0)
    assert float(loss) == pytest.approx(16.0)


def test_loss_mse_known_error() -> None:
    target = torch.zeros(2, 1, 128, 128)
    reconstruction = torch.full_like(target, 0.1)
    zeros = torch.zeros(2, 4)
    _, recon, _ = elbo_loss(reconstruction, target, zeros, zeros, reconstruction_loss="mse")
    assert float(recon) == pytest.approx(128 * 128 * 0.01, rel=1e-5)


def test_error_map_mean() -> None:
    target = torch.zeros(1, 1, 4, 4)
    reconstruction = torch.zeros(1, 1, 4, 4)
    reconstruction[0, 0, 0, 0] = 1.0
    per_pixel, per_image = error_map(reconstruction, target)
    assert float(per_pixel.sum()) == 1.0
    assert float(per_image[0]) == pytest.approx(1 / 16)


def make_checkpoint(seed: int = 0, calibration: dict | None = None) -> Checkpoint:
    torch.manual_seed(seed)
    model = VAE(preset("tiny"))
    return Checkpoint(
        model_config=model.config,
        state_dict=model.state_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=calibration,
        split={"seed": 0, "train": ["a"], "validation": ["b"], "test": ["c"]},
        training={"epochs": 0},
    )


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(calibration=build_calibration([0.1, 0.2, 0.3], ["L-MLO"] * 3))
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["preprocessing_version"] == PREPROCESSING_VERSION
    loaded = load_checkpoint(path)
    assert loaded.model_config == checkpoint.model_config
    assert loaded.calibration == checkpoint.calibration
    assert loaded.split == checkpoint.split
    for name, tensor in checkpoint.state_dict.items():
        torch.testing.assert_close(loaded.state_dict[name], tensor, rtol=0, atol=0)
    assert loaded.model_version == file_sha256(path)[:16]
    assert not list(tmp_path.glob(".model.pt.*"))


def test_checkpoint_missing_keys_rejected(tmp_path: Path) -> None:
    torch.save({"format": "mammo-vae-checkpoint/1", "state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks the keys"):
        load_checkpoint(tmp_path / "bad.pt")


def test_checkpoint_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_calibration_statistics() -> None:
    scores = [float(value) for value in range(1, 21)]
    groups = ["L-MLO"] * 12 + ["R-MLO"] * 8
    calibration = build_calibration(scores, groups, specificity=0.9)
    overall = calibration["overall"]
    assert overall["count"] == 20
    assert overall["mean"] == pytest.approx(10.5)
    assert overall["std"] == pytest.approx(np.std(scores, ddof=1))
    assert overall["specificity_quantile"] == pytest.approx(np.quantile(scores, 0.9))
    assert overall["percentiles"]["50"] == pytest.approx(10.5)
    assert calibration["groups"]["L-MLO"]["count"] == 12
    assert calibration["groups"]["R-MLO"]["mean"] == pytest.approx(16.5)


def test_calibration_group_fallback() -> None:
    groups = ["L-MLO"] * MIN_GROUP_COUNT + ["R-MLO"] * (MIN_GROUP_COUNT - 1)
    calibration = build_calibration([0.1] * len(groups), groups)
    assert statistics_for(calibration, "L-MLO")[0] == "L-MLO"
    assert statistics_for(calibration, "R-MLO")[0] == "overall"
    assert statistics_for(calibration, calibration_group(None, "CC"))[0] == "overall"


def test_threshold_rules() -> None:
    stats = build_calibration([1.0, 2.0, 3.0, 4.0], ["L-MLO"] * 4, specificity=0.5)["overall"]
    assert threshold_for(stats, "mean") == pytest.approx(2.5)
    assert threshold_for(stats, "specificity") == pytest.approx(2.5)
    assert z_score(2.5 + stats["std"], stats) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="threshold rule"):
        threshold_for(stats, "median")


def test_calibration_rejects_bad_specificity() -> None:
    with pytest.raises(ValueError, match="specificity"):
        build_calibration([0.1, 0.2], ["L-MLO", "L-MLO"], specificity=1.0)


def test_scorer_scores_deterministically(tiny_checkpoint: Path) -> None:
    scorer = Scorer(tiny_checkpoint)
    image = np.random.default_rng(0).random((128, 128), dtype=np.float32)
    first = scorer.score(image, "L", "MLO")
    second = scorer.score(image, "L", "MLO")
    assert first.reconstruction_error == second.reconstruction_error
    assert first.reconstruction.shape == (128, 128)
    assert first.error_map.shape == (128, 128)
    assert first.reconstruction_error == pytest.approx(float(first.error_map.mean()), rel=1e-5)
    assert first.calibration_group == "L-MLO"
    assert first.anomalous == (first.reconstruction_error > first.threshold)


def test_scorer_batch_matches_single(tiny_checkpoint: Path) -> None:
    scorer = Scorer(tiny_checkpoint, threshold_rule="mean")
    images = np.random.default_rng(1).random((3, 128, 128), dtype=np.float32)
    batch = scorer.score_batch(images, ["L", "R", None], ["CC", "MLO", None])
    single = scorer.score(images[1], "R", "MLO")
    assert batch[1].reconstruction_error == pytest.approx(single.reconstruction_error, rel=1e-6)
    assert batch[2].calibration_group == "overall"
    stats = Scorer(tiny_checkpoint).checkpoint.calibration["overall"]
    assert batch[2].threshold == pytest.approx(stats["mean"])


def test_scorer_without_calibration(tmp_path: Path) -> None:
    path = save_checkpoint(make_checkpoint(), tmp_path / "plain.pt")
    result = Scorer(path).score(np.zeros((128, 128), dtype=np.float32))
    assert result.z_score is None
    assert result.anomalous is None


def test_prior_samples_fixed_by_seed(tiny_checkpoint: Path) -> None:
    first = draw_samples(tiny_checkpoint, 4, seed=3)
    again = draw_samples(tiny_checkpoint, 4, seed=3)
    other = draw_samples(tiny_checkpoint, 4, seed=4)
    assert first.shape == (4, 128, 128)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_shipped_checkpoint() -> None:
    path = default_checkpoint_path()
    assert path.is_file(), f"shipped checkpoint {path} is missing"
    assert path.stat().st_size <= SHIPPED_LIMIT_BYTES
    checkpoint = load_checkpoint()
    assert checkpoint.preprocessing_version == PREPROCESSING_VERSION
    assert checkpoint.calibration is not None
    assert checkpoint.data_summary["data_format"] == "mini-mias"
    assert checkpoint.split["test"], "shipped checkpoint records no test patients"
    assert checkpoint.model_config.latent_size < 1024
    model = checkpoint.build_model()
    with torch.no_grad():
        reconstruction, _, _ = model(torch.zeros(1, 1, 128, 128))
    assert reconstruction.shape == (1, 1, 128, 128)

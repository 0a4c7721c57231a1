"""Tests of the training package: data sources, splits, cache and the command-line tools."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dicom_factory
from model.checkpoint import load_checkpoint
from model.scoring import Scorer
from model.preprocess import PREPROCESSING_VERSION
from model.vae import VAE, VAEConfig
from training import cache as cache_module
from training.cache import load_or_build_cache
from training.crossval import partner_indices
from training.data import (
    MIAS_CLASSES,
    PatientSplit,
    folder_records,
    load_records,
    make_split,
    mias_patient_id,
    mias_records,
    read_mias_info,
    split_counts,
    vindr_records,
)

REPOSITORY = Path(__file__).resolve().parents[1]
# Six women, twelve films: three with two normal films, three with one normal and one
# abnormal film (mdb005 CIRC, mdb010 CIRC, mdb012 CIRC).
SMALL_MIAS_FILMS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 33, 34)


def run_module(module: str, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module`` from the repository root and fail with its output on error."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )
    assert result.returncode == 0, f"{module} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def write_small_mias(source: Path, target: Path, films: tuple[int, ...] = SMALL_MIAS_FILMS) -> Path:
    """A mini-MIAS folder with a subset of the films (linked) and their Info.txt rows."""
    (target / "images").mkdir(parents=True)
    names = {f"mdb{number:03d}" for number in films}
    rows = [line for line in (source / "Info.txt").read_text(encoding="latin-1").splitlines() if line[:6] in names]
    (target / "Info.txt").write_text("\n".join(rows) + "\n", encoding="latin-1")
    for name in sorted(names):
        (target / "images" / f"{name}.pgm.gz").symlink_to(source / "images" / f"{name}.pgm.gz")
    return target


@pytest.fixture(scope="module")
def mias_dir(data_dir: Path) -> Path:
    return data_dir / "mini-mias"


@pytest.fixture(scope="module")
def small_mias(mias_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_mias(mias_dir, tmp_path_factory.mktemp("mias") / "mini-mias")


# mini-MIAS source ---------------------------------------------------------------


def test_mias_records_counts(mias_dir: Path) -> None:
    records = mias_records(mias_dir)
    assert len(records) == 322
    assert sum(record.healthy for record in records) == 207
    assert len({record.patient_id for record in records}) == 161
    assert {record.view_position for record in records} == {"MLO"}
    assert {record.tissue for record in records} == {"F", "G", "D"}
    abnormal_classes = {name for record in records for name in record.abnormality_classes}
    assert abnormal_classes == set(MIAS_CLASSES)


def test_mias_records_labels_and_sides(mias_dir: Path) -> None:
    by_film = {record.image_id: record for record in mias_records(mias_dir)}
    assert by_film["mdb001"].laterality == "R"
    assert by_film["mdb002"].laterality == "L"
    assert by_film["mdb001"].patient_id == by_film["mdb002"].patient_id == mias_patient_id("mdb002")
    assert by_film["mdb003"].label == "healthy"
    assert by_film["mdb003"].abnormality_classes == ()
    # mdb005 has two CIRC rows, mdb144 two MISC rows of different severity.
    assert by_film["mdb005"].abnormality_classes == ("CIRC",)
    assert by_film["mdb144"].abnormality_classes == ("MISC",)
    assert by_film["mdb059"].label == "abnormal"


def test_mias_info_keeps_every_row(mias_dir: Path) -> None:
    info = read_mias_info(mias_dir / "Info.txt")
    assert sum(len(rows) for rows in info.values()) == 330
    assert [row.severity for row in info["mdb144"]] == ["B", "M"]
    assert info["mdb216"][0].abnormality_class == "CALC"


def test_mias_uncompressed_films_in_folder(mias_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "Info.txt").write_text("mdb001 G CIRC B 535 425 197\nmdb003 D NORM \n", encoding="latin-1")
    for name in ("mdb001", "mdb003"):
        (tmp_path / f"{name}.pgm").write_bytes(gzip.decompress((mias_dir / "images" / f"{name}.pgm.gz").read_bytes()))
    records = mias_records(tmp_path)
    assert [record.image_id for record in records] == ["mdb001", "mdb003"]
    assert [record.label for record in records] == ["abnormal", "healthy"]
    assert records[0].path.name == "mdb001.pgm"


def test_mias_missing_info_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Info.txt"):
        mias_records(tmp_path)


def test_mias_film_without_file_skipped(small_mias: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = small_mias.parent / "with-extra-row"
    folder.mkdir()
    (folder / "images").symlink_to(small_mias / "images")
    (folder / "Info.txt").write_text((small_mias / "Info.txt").read_text() + "mdb200 F NORM \n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        records = mias_records(folder)
    assert len(records) == len(SMALL_MIAS_FILMS)
    assert "1 films listed" in caplog.text


# VinDr-Mammo source -------------------------------------------------------------

# (study, image, laterality, view, mini-MIAS film, finding rows, split); films of odd
# numbers are right breasts, even numbers left ones.
VINDR_IMAGES = [
    ("study-a", "a-rcc", "R", "CC", 7, ["['No Finding']"], "training"),
    ("study-a", "a-lcc", "L", "CC", 8, ["['No Finding']"], "training"),
    ("study-a", "a-rmlo", "R", "MLO", 3, ["['No Finding']"], "training"),
    ("study-a", "a-lmlo", "L", "MLO", 4, ["['No Finding']"], "training"),
    ("study-b", "b-rcc", "R", "CC", 1, ["['Mass']", "['Suspicious Calcification']"], "training"),
    ("study-b", "b-lcc", "L", "CC", 6, ["['No Finding']"], "training"),
    ("study-b", "b-rmlo", "R", "MLO", 5, ["['Mass', 'Architectural Distortion']"], "training"),
    ("study-b", "b-lmlo", "L", "MLO", 14, ["['No Finding']"], "training"),
    ("study-c", "c-rmlo", "R", "MLO", 9, ["['No Finding']"], "test"),
    ("study-c", "c-lmlo", "L", "MLO", 10, ["['Mass']"], "test"),
    ("study-d", "d-rmlo", "R", "MLO", 11, ["['No Finding']"], "training"),
    ("study-d", "d-lmlo", "L", "MLO", 16, ["['No Finding']"], "training"),
]
VINDR_COLUMNS = [
    "study_id", "series_id", "image_id", "laterality", "view_position",
    "breast_birads", "breast_density", "finding_categories", "split",
]


def write_vindr_csv(path: Path, with_health: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(VINDR_COLUMNS + (["Health"] if with_health else []))
        for study, image, laterality, view, _, findings, split in VINDR_IMAGES:
            for finding in findings:
                row = [study, f"{study}-series", image, laterality, view, "BI-RADS 1", "DENSITY C", finding, split]
                if with_health:
                    row.append("0" if finding == "['No Finding']" else "1")
                writer.writerow(row)
    return path


@pytest.fixture(scope="module")
def vindr_dicom(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VinDr layout with DICOM images: <root>/images/<study_id>/<image_id>.dicom."""
    root = tmp_path_factory.mktemp("vindr-dicom")
    for study, image, laterality, view, film, _, _ in VINDR_IMAGES:
        pixels = dicom_factory.to_bits(dicom_factory.load_mias(film)[::4, ::4], 12)
        ds = dicom_factory.make_mammogram(pixels, laterality, view, study_key=study, instance_key=image)
        (root / "images" / study).mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "images" / study / f"{image}.dicom", enforce_file_format=True)
    write_vindr_csv(root / "finding_annotations.csv")
    return root


@pytest.fixture(scope="module")
def vindr_png(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VinDr layout with 8-bit PNG images beside the CSV: <root>/<study_id>/<image_id>.png."""
    root = tmp_path_factory.mktemp("vindr-png")
    for study, image, _, _, film, _, _ in VINDR_IMAGES:
        (root / study).mkdir(exist_ok=True)
        Image.fromarray(dicom_factory.load_mias(film)[::4, ::4]).save(root / study / f"{image}.png")
    write_vindr_csv(root / "annotations.csv", with_health=True)
    return root


def test_vindr_labels_from_findings(vindr_dicom: Path) -> None:
    records = {record.image_id: record for record in vindr_records(vindr_dicom)}
    assert len(records) == len(VINDR_IMAGES)
    assert records["a-rcc"].healthy
    assert records["a-rcc"].path == vindr_dicom / "images" / "study-a" / "a-rcc.dicom"
    assert records["b-rcc"].label == "abnormal"
    assert records["b-rcc"].abnormality_classes == ("Mass", "Suspicious Calcification")
    assert records["b-rmlo"].abnormality_classes == ("Architectural Distortion", "Mass")
    assert records["b-lcc"].healthy
    assert records["b-rcc"].patient_id == records["b-lcc"].patient_id == "study-b"
    assert records["c-lmlo"].source_split == "test"
    assert records["a-lmlo"].tissue == "DENSITY C"
    assert (records["a-lmlo"].laterality, records["a-lmlo"].view_position) == ("L", "MLO")


def test_vindr_view_and_split_filters(vindr_dicom: Path) -> None:
    mlo = vindr_records(vindr_dicom / "finding_annotations.csv", views=["MLO"])
    assert {record.view_position for record in mlo} == {"MLO"}
    assert len(mlo) == 8
    test_split = vindr_records(vindr_dicom, split="test")
    assert {record.patient_id for record in test_split} == {"study-c"}


def test_vindr_health_column_and_png(vindr_png: Path) -> None:
    records = {record.image_id: record for record in vindr_records(vindr_png)}
    assert records["a-rcc"].path.suffix == ".png"
    assert records["a-rcc"].healthy
    assert not records["c-lmlo"].healthy
    assert sum(record.healthy for record in records.values()) == 9


def test_vindr_missing_image_skipped(vindr_png: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv_path = tmp_path / "annotations.csv"
    csv_path.write_text((vindr_png / "annotations.csv").read_text() + "study-z,s,z-img,L,CC,,,['No Finding'],training,0\n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        records = vindr_records(csv_path, image_root=vindr_png)
    assert len(records) == len(VINDR_IMAGES)
    assert "1 images" in caplog.text


def test_vindr_missing_columns_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("study_id,image_id\nx,y\n")
    with pytest.raises(ValueError, match="laterality"):
        vindr_records(tmp_path / "bad.csv")


def test_vindr_dicom_preprocessed_by_header(vindr_dicom: Path, tmp_path: Path) -> None:
    records = vindr_records(vindr_dicom)
    cached = load_or_build_cache(records, tmp_path, threads=1)
    assert cached.failures == {}
    assert cached.images.shape == (len(records), 128, 128)
    for index, record in enumerate(records):
        assert cached.view_of(index) == (record.laterality, record.view_position)


def test_vindr_png_preprocessed(vindr_png: Path, tmp_path: Path) -> None:
    records = vindr_records(vindr_png)
    cached = load_or_build_cache(records, tmp_path, threads=2)
    assert cached.failures == {}
    assert cached.images.dtype == np.float32
    assert float(cached.images.min()) >= 0.0
    assert float(cached.images.max()) <= 1.0


# Folder source ---------------------------------------------------------------------


def test_folder_patients_and_labels(data_dir: Path, tmp_path: Path) -> None:
    film = dicom_factory.load_mias(4)[::4, ::4]
    for relative in ("p1/a.png", "p1/b.png", "p2/c.png", "d.png"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        Image.fromarray(film).save(tmp_path / relative)
    (tmp_path / "notes.txt").write_text("not an image")
    records = folder_records(tmp_path)
    assert [record.image_id for record in records] == ["d.png", "p1/a.png", "p1/b.png", "p2/c.png"]
    assert [record.patient_id for record in records] == ["d.png", "p1", "p1", "p2"]
    assert all(record.healthy for record in records)
    cached = load_or_build_cache(records, tmp_path / "cache", threads=1)
    assert cached.failures == {}


def test_folder_dicom_takes_header_view(data_dir: Path, tmp_path: Path) -> None:
    datasets = dicom_factory.make_study({("L", "CC"): 8, ("R", "MLO"): 3}, "folder-study", downscale=4)
    dicom_factory.write_study(datasets, tmp_path / "images" / "patient-1")
    records = folder_records(tmp_path / "images")
    cached = load_or_build_cache(records, tmp_path / "cache", threads=1)
    assert sorted(cached.views) == [("L", "CC"), ("R", "MLO")]


def test_load_records_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mini-mias"):
        load_records("inbreast", tmp_path)


# Patient-level split -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_keeps_women_together(mias_dir: Path, seed: int) -> None:
    records = mias_records(mias_dir)
    split = make_split(records, seed)
    sides: dict[str, set[str]] = {}
    for record in records:
        side = split.name_of(record.patient_id)
        assert side is not None, f"patient {record.patient_id} is in no split"
        sides.setdefault(record.patient_id, set()).add(side)
    assert all(len(names) == 1 for names in sides.values())
    assert not set(split.train) & set(split.validation)
    assert not set(split.train) & set(split.test)
    assert not set(split.validation) & set(split.test)


def test_split_fractions_and_abnormal_test_films(mias_dir: Path) -> None:
    records = mias_records(mias_dir)
    split = make_split(records, seed=0)
    counts = split_counts(split, records)
    assert (counts["train"]["patients"], counts["validation"]["patients"], counts["test"]["patients"]) == (97, 24, 40)
    # Stratification gives the test split about its share (25%) of the 115 abnormal films.
    assert 20 <= counts["test"]["abnormal_images"] <= 38
    test_films = [records[index] for index in split.select(records, "test")]
    assert {record.patient_id for record in test_films} == set(split.test)
    assert any(not record.healthy for record in test_films)


def test_split_fixed_by_seed(mias_dir: Path) -> None:
    records = mias_records(mias_dir)
    assert make_split(records, 7).to_dict() == make_split(records, 7).to_dict()
    assert make_split(records, 7).test != make_split(records, 8).test


def test_split_json_round_trip(mias_dir: Path, tmp_path: Path) -> None:
    records = mias_records(mias_dir)
    split = make_split(records, 0, data_format="mini-mias")
    path = split.write_json(tmp_path / "split.json", records)
    payload = json.loads(path.read_text())
    assert payload["counts"]["test"]["patients"] == len(split.test)
    assert PatientSplit.from_dict(payload) == split


def test_split_rejects_bad_fractions(mias_dir: Path) -> None:
    records = mias_records(mias_dir)
    with pytest.raises(ValueError, match="sum to 1"):
        make_split(records, 0, {"train": 0.5, "validation": 0.1, "test": 0.1})


# Cache -----------------------------------------------------------------------------


def test_cache_reused_without_preprocessing(small_mias: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = mias_records(small_mias)
    first = load_or_build_cache(records, tmp_path, threads=2)
    assert not first.hit
    assert first.path.name.startswith(PREPROCESSING_VERSION)
    assert first.images.shape == (len(records), 128, 128)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("preprocessing ran although the cache should have been used")

    monkeypatch.setattr(cache_module, "preprocess_path", fail)
    second = load_or_build_cache(records, tmp_path, threads=1)
    assert second.hit
    np.testing.assert_array_equal(second.images, first.images)
    assert second.views == first.views


def test_cache_key_changes_with_file_list(small_mias: Path, tmp_path: Path) -> None:
    records = mias_records(small_mias)
    load_or_build_cache(records[:2], tmp_path, threads=1)
    other = load_or_build_cache(records[:3], tmp_path, threads=1)
    assert not other.hit
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_cache_records_rejected_images(small_mias: Path, tmp_path: Path) -> None:
    broken = tmp_path / "images" / "mdb001.pgm"
    broken.parent.mkdir()
    broken.write_bytes(b"P5\n1024 1024\n255\n" + b"\0" * 10)
    (tmp_path / "Info.txt").write_text("mdb001 G CIRC B 535 425 197\nmdb003 D NORM \n")
    (tmp_path / "images" / "mdb003.pgm.gz").symlink_to((small_mias / "images" / "mdb003.pgm.gz").resolve())
    cached = load_or_build_cache(mias_records(tmp_path), tmp_path / "cache", threads=1)
    assert cached.indices == [1]
    assert 0 in cached.failures


# Command-line tools ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(small_mias: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the tiny preset on the twelve films; returns the output folder."""
    out = tmp_path_factory.mktemp("fit") / "run"
    run_module(
        "training.fit", "--data-format", "mini-mias", "--data", str(small_mias), "--out", str(out),
        "--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--threads", "2",
        "--cache-dir", str(out.parent / "cache"),
    )
    return out


def test_fit_writes_outputs(fitted: Path) -> None:
    for name in ("model.pt", "last.pt", "history.csv", "loss.png", "split.json"):
        assert (fitted / name).is_file(), f"{name} missing"
    with open(fitted / "history.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 1
    assert float(rows[0]["validation_loss"]) > 0


def test_fit_checkpoint_contents(fitted: Path) -> None:
    raw = torch.load(fitted / "model.pt", map_location="cpu", weights_only=True)
    assert raw["preprocessing_version"] == PREPROCESSING_VERSION
    assert VAEConfig.from_dict(raw["model_config"]).initial_channels == 8
    split = json.loads((fitted / "split.json").read_text())
    assert raw["split"]["test"] == split["test"]
    assert raw["data_summary"]["data_format"] == "mini-mias"
    assert raw["data_summary"]["images"] == len(SMALL_MIAS_FILMS)
    assert raw["training"]["epochs"] == 1
    assert raw["training"]["preset"] == "tiny"
    assert raw["calibration"]["overall"]["count"] == raw["data_summary"]["validation_images"]
    assert raw["calibration"]["threshold_rule"] == "specificity"
    assert raw["code_version"]

    checkpoint = load_checkpoint(fitted / "model.pt")
    model = checkpoint.build_model()
    reference = VAE(checkpoint.model_config)
    reference.load_state_dict(raw["state_dict"])
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


def test_fit_last_checkpoint_holds_optimizer(fitted: Path) -> None:
    raw = torch.load(fitted / "last.pt", map_location="cpu", weights_only=True)
    assert raw["resume"]["epoch"] == 1
    assert raw["resume"]["optimizer_state"]["state"], "optimizer state is empty"
    assert len(raw["resume"]["history"]) == 1


def test_fit_resume_continues(fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "last.pt").write_bytes((fitted / "last.pt").read_bytes())
    run_module(
        "training.fit", "--data-format", "mini-mias", "--data", str(small_mias), "--out", str(out),
        "--epochs", "2", "--batch-size", "4", "--threads", "2", "--resume",
        "--cache-dir", str(fitted.parent / "cache"),
    )
    with open(out / "history.csv", newline="") as stream:
        epochs = [int(row["epoch"]) for row in csv.DictReader(stream)]
    assert epochs == [1, 2]
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert raw["resume"]["epoch"] == 2
    assert raw["training"]["preset"] == "tiny"
    assert load_checkpoint(out / "model.pt").calibration is not None


def test_calibrate_rewrites_checkpoint(fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes((fitted / "model.pt").read_bytes())
    before = load_checkpoint(path)
    run_module(
        "training.calibrate", "--checkpoint", str(path), "--data-format", "mini-mias", "--data", str(small_mias),
        "--threshold-rule", "mean", "--specificity", "0.9", "--cache-dir", str(fitted.parent / "cache"),
        "--threads", "1",
    )
    after = load_checkpoint(path)
    assert after.calibration["threshold_rule"] == "mean"
    assert after.calibration["specificity"] == 0.9
    assert after.calibration["overall"]["mean"] == pytest.approx(before.calibration["overall"]["mean"], rel=1e-6)
    assert after.split == before.split
    assert not list(tmp_path.glob(".model.pt.*")), "temporary file left behind"


def test_evaluate_prints_json_line(fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    result = run_module(
        "training.evaluate", "--checkpoint", str(fitted / "model.pt"), "--data-format", "mini-mias",
        "--data", str(small_mias), "--out", str(tmp_path), "--bootstrap", "200",
        "--cache-dir", str(fitted.parent / "cache"), "--threads", "1",
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert 0.0 <= metrics["auroc"] <= 1.0
    assert metrics["split"] == "test"
    assert metrics["counts"]["abnormal_images"] >= 1
    assert metrics["counts"]["healthy_images"] >= 1
    assert set(metrics["thresholds"]) == {"mean", "specificity"}
    assert "CIRC" in metrics["per_class_auroc"]
    assert metrics["bootstrap"]["resamples"] == 200
    for name in ("roc.png", "reconstructions.png", "evaluation.json"):
        assert (tmp_path / name).is_file(), f"{name} missing"


@pytest.fixture(scope="module")
def patch_fitted(small_mias: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the tiny preset on two 128-pixel patches of each 512-pixel training view."""
    out = tmp_path_factory.mktemp("patch-fit") / "run"
    run_module(
        "training.fit", "--data-format", "mini-mias", "--data", str(small_mias), "--out", str(out),
        "--preset", "tiny", "--latent-size", "16", "--epochs", "1", "--batch-size", "8", "--threads", "2",
        "--resolution-policy", "patches", "--patches-per-view", "2",
        "--cache-dir", str(out.parent / "cache"),
    )
    return out


def test_patch_fit_stores_score(patch_fitted: Path) -> None:
    checkpoint = load_checkpoint(patch_fitted / "model.pt")
    assert checkpoint.score_name == "contra_kl_mean"
    assert checkpoint.model_config.input_size == 128
    scoring = checkpoint.training["scoring"]
    assert scoring["resolution_policy"] == "patches"
    assert scoring["patch_resolution"] == 512
    assert scoring["patch_stride"] == 64
    assert checkpoint.training["patches_per_view"] == 2
    assert checkpoint.calibration["score"] == "contra_kl_mean"
    assert Scorer(checkpoint, backend="torch").view_size == 512


def test_whole_fit_keeps_global_mse(fitted: Path) -> None:
    checkpoint = load_checkpoint(fitted / "model.pt")
    assert checkpoint.score_name == "global_mse"
    assert checkpoint.training["scoring"]["resolution_policy"] == "whole"
    assert Scorer(checkpoint, backend="torch").view_size == 128


def test_patch_calibrate_on_breast_pairs(patch_fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes((patch_fitted / "model.pt").read_bytes())
    run_module(
        "training.calibrate", "--checkpoint", str(path), "--data-format", "mini-mias", "--data", str(small_mias),
        "--subset", "all", "--cache-dir", str(patch_fitted.parent / "cache"), "--threads", "1",
    )
    checkpoint = load_checkpoint(path)
    records = load_records("mini-mias", small_mias)
    cache = load_or_build_cache(records, patch_fitted.parent / "cache", size=512, threads=1)
    scorer = Scorer(checkpoint, backend="torch")
    images, kept = cache.select(range(len(records)))
    assert kept == list(range(len(records)))
    values = scorer.score_values(images)
    partners = partner_indices(records)
    healthy = [index for index, record in enumerate(records) if record.healthy]
    # Every film's other breast is among the twelve, so every healthy view is calibrated.
    assert all(partners[index] >= 0 for index in healthy)
    differences = np.array([values[index] - values[partners[index]] for index in healthy])

    overall = checkpoint.calibration["overall"]
    assert checkpoint.calibration["score"] == "contra_kl_mean"
    assert overall["count"] == len(healthy)
    assert overall["mean"] == pytest.approx(differences.mean(), rel=1e-4, abs=1e-9)
    assert overall["std"] == pytest.approx(differences.std(ddof=1), rel=1e-4, abs=1e-9)


def test_patch_evaluate_prints_json_line(patch_fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    result = run_module(
        "training.evaluate", "--checkpoint", str(patch_fitted / "model.pt"), "--data-format", "mini-mias",
        "--data", str(small_mias), "--out", str(tmp_path), "--bootstrap", "50",
        "--cache-dir", str(patch_fitted.parent / "cache"), "--threads", "1",
    )
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["score"] == "contra_kl_mean"
    assert metrics["counts"]["abnormal_images"] >= 1
    assert metrics["counts"]["healthy_images"] >= 1
    assert 0.0 <= metrics["auroc"] <= 1.0
    for name in ("roc.png", "reconstructions.png", "evaluation.json"):
        assert (tmp_path / name).is_file(), f"{name} missing"


def test_sample_writes_grid(fitted: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples.png"
    run_module("training.sample", "--checkpoint", str(fitted / "model.pt"), "--count", "6", "--columns", "3",
               "--out", str(out))
    with Image.open(out) as grid:
        assert grid.size == (3 * 128, 2 * 128)
        assert grid.mode == "L"
        pixels = np.asarray(grid)
    assert pixels.std() > 0, "prior samples are blank"


def test_fit_under_torchrun(fitted: Path, small_mias: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_module(
        "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.fit", "--data-format", "mini-mias", "--data", str(small_mias), "--out", str(out),
        "--preset", "tiny", "--epochs", "1", "--batch-size", "2", "--threads", "2",
        "--cache-dir", str(fitted.parent / "cache"),
        timeout=180,
    )
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.training["machine"]["world_size"] == 2
    assert checkpoint.calibration is not None
    assert checkpoint.split == load_checkpoint(fitted / "model.pt").split
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == [
        "history.csv", "last.pt", "loss.png", "model.pt", "split.json",
    ]


def test_fit_on_vindr_dicom(vindr_dicom: Path, tmp_path: Path) -> None:
    run_module(
        "training.fit", "--data-format", "vindr", "--data", str(vindr_dicom), "--out", str(tmp_path),
        "--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--threads", "1",
    )
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint.data_summary["data_format"] == "vindr"
    assert set(checkpoint.split["test"]) <= {"study-a", "study-b", "study-c", "study-d"}
    assert (tmp_path / "cache").is_dir()

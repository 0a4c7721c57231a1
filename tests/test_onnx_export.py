"""ONNX export (``python -m training.export``) and the ONNX Runtime backend of the Scorer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from model.scoring import Scorer

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_export_cli_writes_model(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "models" / "tiny.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "training.export", "--checkpoint", str(tiny_checkpoint), "--onnx", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "largest difference to torch" in result.stderr
    model = onnx.load(out)
    assert [node.name for node in model.graph.input] == ["image"]
    assert [node.name for node in model.graph.output] == ["reconstruction", "mu", "logvar"]

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((3, 1, 128, 128), dtype=np.float32)
    reconstruction, mu, _ = session.run(None, {"image": images})
    assert reconstruction.shape == (3, 1, 128, 128)
    assert mu.shape == (3, 16)


def test_export_cli_missing_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.export", "--checkpoint", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "x.onnx")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "not found" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_scores_match_torch(tiny_checkpoint: Path, threads: int) -> None:
    images = np.random.default_rng(1).random((4, 128, 128), dtype=np.float32)
    lateralities, views = ["L", "R", "L", "R"], ["CC", "CC", "MLO", "MLO"]
    by_torch = Scorer(tiny_checkpoint, backend="torch").score_batch(images, lateralities, views)
    by_onnxruntime = Scorer(tiny_checkpoint, backend="onnxruntime", threads=threads).score_batch(images, lateralities, views)
    for expected, actual in zip(by_torch, by_onnxruntime):
        assert actual.reconstruction_error == pytest.approx(expected.reconstruction_error, rel=1e-5)
        assert actual.z_score == pytest.approx(expected.z_score, abs=1e-4)
        assert np.abs(actual.reconstruction - expected.reconstruction).max() < 1e-5
        assert actual.anomalous == expected.anomalous


def test_scorer_backend_choice(tiny_checkpoint: Path) -> None:
    assert Scorer(tiny_checkpoint).backend == "onnxruntime"
    assert Scorer(tiny_checkpoint, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend 'tensorrt' is not one of"):
        Scorer(tiny_checkpoint, backend="tensorrt")  # type: ignore[arg-type]

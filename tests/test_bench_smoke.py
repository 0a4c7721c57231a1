"""``python -m bench --smoke``: every benchmark runs on tiny inputs and the page is written.

The smoke run, images included, takes about 40 s on a 2-core machine under a load average
of 6. The timeout only stops a hung run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## 1. Ingest: worker against DCMTK storescp",
    "## 2a. Decoding: full against reduced resolution",
    "## 2b. Per-view latency in the worker",
    "## 2c. Per-view timings in the worker's result rows",
    "## 3. Inference",
    "## 4. Study turnaround",
    "## 5. Training throughput",
    "## 6. Memory",
)


def test_bench_smoke_writes_page(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--image-dir", str(tmp_path / "images")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = out.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert heading in page
    assert ": failed" not in page
    assert "Smoke run" in page
    assert "load average (1, 5, 15 min)" in page

"""Run the benchmarks and write their Markdown page: ``python -m bench [--smoke] [--out FILE]``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench import machine
from bench.config import BenchConfig, default_data_dir
from bench.images import ENCODINGS, StudyFiles, write_full_field_study
from bench.profiling import REPO_ROOT
from bench.report import Section
from model.checkpoint import Checkpoint, default_checkpoint_path, load_checkpoint, save_checkpoint
from model.preprocess import PREPROCESSING_VERSION
from model.scoring import build_calibration
from model.vae import VAE, preset

logger = logging.getLogger(__name__)

BENCHMARKS = ("training", "decode", "latency", "inference", "ingest", "memory")
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_IMAGE_DIR = Path(tempfile.gettempdir()) / "mammo-vae-bench-images"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark ingest, decoding, inference, study turnaround, training and memory; write a Markdown page.",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny inputs and one repeat: checks that every benchmark runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write (default docs/benchmarks.md)")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated benchmarks to run (default all: {','.join(BENCHMARKS)})"
    )
    parser.add_argument(
        "--image-dir", type=Path, default=DEFAULT_IMAGE_DIR,
        help="folder that keeps the generated test studies between runs (default %(default)s)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="real data folder (default MAMMO_DATA_DIR or ../shared/data)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="checkpoint to score with (default: the shipped one if it exists, else one trained by the training benchmark)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder of this run")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown or not selected:
        parser.error(f"--only lists {unknown or 'nothing'}; expected some of {', '.join(BENCHMARKS)}")
    args.only = [name for name in BENCHMARKS if name in selected]
    return args


def choose_checkpoint(requested: Path | None) -> Path | None:
    if requested is not None:
        return requested
    shipped = default_checkpoint_path()
    if shipped.is_file() and load_checkpoint(shipped).preprocessing_version == PREPROCESSING_VERSION:
        return shipped
    return None


def untrained_checkpoint(config: BenchConfig) -> Path:
    """Save an untrained model of the training preset with a made-up calibration, for when no trained one exists."""
    torch.manual_seed(0)
    model = VAE(preset(config.training_preset))
    checkpoint = Checkpoint(
        model_config=model.config,
        state_dict=model.state_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        calibration=build_calibration([0.01 + 0.001 * i for i in range(40)], ["L-CC", "R-CC", "L-MLO", "R-MLO"] * 10),
        data_summary={"source": "untrained benchmark model"},
    )
    return save_checkpoint(checkpoint, config.work_dir / "untrained.pt")


def prepare_studies(config: BenchConfig) -> dict[str, StudyFiles]:
    started = time.perf_counter()
    studies = {encoding: write_full_field_study(config.image_dir, "bench", encoding, config.shape) for encoding in ENCODINGS}
    logger.info("test studies ready in %.1f s", time.perf_counter() - started)
    return studies


def run_guarded(name: str, function: Callable[[], Section | list[Section]]) -> tuple[list[Section], bool]:
    """Run one benchmark; a failure becomes a section with the error instead of ending the run."""
    started = time.perf_counter()
    logger.info("benchmark %s: started", name)
    try:
        result = function()
    except Exception as err:  # noqa: BLE001 - one failed benchmark must not lose the others' figures
        logger.error("benchmark %s failed:\n%s", name, traceback.format_exc())
        section = Section(f"{name}: failed", "see the error")
        section.verdict = f"failed: {type(err).__name__}: {err}"
        return [section], False
    logger.info("benchmark %s: finished in %.0f s", name, time.perf_counter() - started)
    return (result if isinstance(result, list) else [result]), True


def summary_section(config: BenchConfig) -> Section:
    results = config.results
    section = Section("Summary", "each figure against its goal; the sections below give the details.")
    table = section.table("", ["benchmark", "goal", "this run", "met"])

    def add(name: str, goal: str, value: float | None, text: str, met: bool) -> None:
        if value is None:
            table.add(name, goal, "not run", "—")
        else:
            table.add(name, goal, text, "yes" if met else "no")

    value = results.get("ingest_ratio")
    add("1. ingest, worker / storescp", "≤ 0.9", value, f"{value:.2f}" if value else "", value is not None and value <= 0.9)
    value = results.get("latency_jpeg2000_ms")
    add("2. per-view latency, JPEG 2000", "≤ 50 ms", value, f"{value:.0f} ms" if value else "", value is not None and value <= 50)
    value = results.get("inference_ms")
    add("3. inference per view", "≤ 10 ms", value, f"{value:.1f} ms" if value else "", value is not None and value <= 10)
    value = results.get("turnaround_s")
    add("4. study turnaround", "≤ 1 s", value, f"{value:.2f} s" if value else "", value is not None and value <= 1)
    value = results.get("training_speedup")
    add("5. training, cached / plain", "≥ 3x", value, f"{value:.1f}x" if value else "", value is not None and value >= 3)
    value = results.get("peak_rss_bytes")
    add("6. worker peak RSS", "≤ 1 GiB", value, f"{value / 2**20:.0f} MiB" if value else "", value is not None and value <= 2**30)
    return section


def render(config: BenchConfig, sections: list[Section], command: str, load_start, load_end, started: str, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench`; do not edit by hand. Every ratio compares figures measured side by side "
        "in the same run.",
        "",
        f"- command: `{command}`",
        f"- date: {started}, {seconds / 60:.1f} minutes",
        "- load average (1, 5, 15 min): "
        f"{', '.join(f'{value:.2f}' for value in load_start)} at the start, "
        f"{', '.join(f'{value:.2f}' for value in load_end)} at the end",
        f"- test study: four views of {config.shape[0]} x {config.shape[1]} pixels, 12 bits stored, mini-MIAS "
        "films scaled up 4x with seeded noise (bench/images.py), as JPEG 2000 lossless and uncompressed",
        f"- checkpoint: {describe_checkpoint(config.checkpoint)}",
    ]
    for key, value in machine.machine_summary().items():
        lines.append(f"- {key}: {value}")
    lines.append("- software: " + ", ".join(f"{name} {version}" for name, version in machine.package_versions().items()))
    cores = machine.usable_cores()
    if max(load_start[0], load_end[0]) > cores:
        lines += [
            "",
            f"The load average exceeded the {cores} usable cores during this run: other jobs shared the machine, "
            "so every time here is longer, and varies more, than on an idle machine.",
        ]
    if config.smoke:
        lines += ["", "**Smoke run: tiny inputs, one repeat. These figures say nothing about performance.**"]
    lines.append("")
    for section in sections:
        lines.append(section.markdown())
    return "\n".join(lines).rstrip() + "\n"


def describe_checkpoint(path: Path | None) -> str:
    if path is None:
        return "none"
    checkpoint = load_checkpoint(path)
    source = (checkpoint.data_summary or {}).get("source") or (checkpoint.data_summary or {}).get("data_name", "")
    label = path.name if path != default_checkpoint_path() else "model/checkpoints/default.pt"
    return f"{label} (model version {checkpoint.model_version}, latent {checkpoint.model_config.latent_size}{', ' + str(source) if source else ''})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    load_start = machine.load_average()
    started_at = machine.now_utc()
    started = time.perf_counter()

    work_dir = Path(tempfile.mkdtemp(prefix="mammo-vae-bench-"))
    config = BenchConfig(
        smoke=args.smoke,
        work_dir=work_dir,
        image_dir=args.image_dir,
        data_dir=(args.data_dir or default_data_dir()).resolve(),
        checkpoint=choose_checkpoint(args.checkpoint),
    )
    sections: list[Section] = []
    all_passed = True
    shared_worker = None
    try:
        studies = prepare_studies(config)
        if config.smoke and {"ingest", "memory"} & set(args.only):
            # A smoke run starts one worker for ingest and memory, in the background while
            # the other benchmarks run, because a start takes seconds.
            from bench import dicom_peers

            if config.checkpoint is None:
                config.checkpoint = untrained_checkpoint(config)
            shared_worker = dicom_peers.start_worker(work_dir / "shared-worker", config.checkpoint, wait=False)
        if "training" in args.only:
            from bench import training_loop

            produced, passed = run_guarded("training", lambda: training_loop.run(config))
            sections += produced
            all_passed &= passed
        if config.checkpoint is None:
            config.checkpoint = untrained_checkpoint(config)
        runners: dict[str, Callable[[], Section | list[Section]]] = {}
        if "decode" in args.only:
            from bench import decode

            runners["decode"] = lambda: decode.run(config, studies)
        if "latency" in args.only:
            from bench import latency

            runners["latency"] = lambda: latency.run(config, studies)
        if "inference" in args.only:
            from bench import inference

            runners["inference"] = lambda: inference.run(config)
        if "ingest" in args.only:
            from bench import ingest

            runners["ingest"] = lambda: ingest.run(config, studies, shared_worker)
            if not config.smoke:
                runners["ingest profile"] = lambda: ingest.profile_receive(config, studies)
                runners["pynetdicom floor"] = lambda: ingest.pynetdicom_floor(config, studies)
        if "memory" in args.only:
            from bench import memory

            runners["memory"] = lambda: memory.run(config, studies, shared_worker)
        for name, runner in runners.items():
            produced, passed = run_guarded(name, runner)
            sections += produced
            all_passed &= passed

        ordered = sorted(sections, key=lambda section: section.title)
        page = render(
            config,
            [summary_section(config), *ordered],
            command,
            load_start,
            machine.load_average(),
            started_at,
            time.perf_counter() - started,
        )
    finally:
        if shared_worker is not None:
            shared_worker.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            logger.info("kept %s", work_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    logger.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The machine and software a benchmark run used, and the load on it."""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "torch", "onnxruntime", "pydicom", "pynetdicom", "pillow", "pylibjpeg-openjpeg", "SQLAlchemy", "highdicom")
DCMTK_FOLDERS = ("/usr/bin", "/usr/local/bin")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # sched_getaffinity exists on Linux only
        return os.cpu_count() or 1


@functools.cache
def dcmtk_tool(name: str) -> str:
    """Path of the DCMTK program ``name``.

    pynetdicom installs Python programs named storescp and storescu that can come first
    on PATH, so the usual DCMTK folders are searched first and each candidate must name
    DCMTK in its ``--version`` output.
    """
    folders = list(DCMTK_FOLDERS) + os.environ.get("PATH", "").split(os.pathsep)
    for folder in folders:
        candidate = Path(folder) / name
        if not os.access(candidate, os.X_OK):
            continue
        try:
            result = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in result.stdout.lower():
            return str(candidate)
    raise FileNotFoundError(f"DCMTK program {name!r} not found in {', '.join(folders)}; install DCMTK (apt-get install dcmtk)")


def dcmtk_version() -> str:
    try:
        result = subprocess.run([dcmtk_tool("storescp"), "--version"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, OSError, subprocess.SubprocessError) as err:
        return f"not found ({err})"
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "unknown"
    return first.strip("$ ").replace("dcmtk: ", "")


def package_versions() -> dict[str, str]:
    versions = {"Python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        from PIL import features

        versions["OpenJPEG (Pillow)"] = str(features.version("jpg_2000"))
    except ImportError:
        pass
    versions["DCMTK"] = dcmtk_version()
    return versions


def machine_summary() -> dict[str, str]:
    memory = memory_gib()
    return {
        "CPU": cpu_model(),
        "cores usable": str(usable_cores()),
        "memory": f"{memory:.1f} GiB" if memory else "unknown",
        "system": platform.platform(),
    }


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

"""cProfile summaries for the report, for one call or for every thread started in a block."""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import Table

REPO_ROOT = Path(__file__).resolve().parents[1]


def profile_call(function: Callable[[], Any]) -> tuple[Any, pstats.Stats]:
    profiler = cProfile.Profile()
    result = profiler.runcall(function)
    return result, pstats.Stats(profiler, stream=io.StringIO())


@contextlib.contextmanager
def thread_profiles() -> Iterator[list[cProfile.Profile]]:
    """Profile every thread started inside the block, each with its own cProfile.Profile.

    cProfile follows one thread only, so ``threading.Thread.run`` is wrapped while the
    block runs. Threads started before the block are not profiled.
    """
    profiles: list[cProfile.Profile] = []
    original_run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profiler = cProfile.Profile()
        profiles.append(profiler)
        profiler.enable()
        try:
            original_run(thread)
        finally:
            profiler.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    try:
        yield profiles
    finally:
        threading.Thread.run = original_run  # type: ignore[method-assign]


def merged(profiles: list[cProfile.Profile]) -> pstats.Stats | None:
    stats = None
    for profiler in profiles:
        profiler.create_stats()
        if not profiler.stats:  # type: ignore[attr-defined]
            continue
        if stats is None:
            stats = pstats.Stats(profiler, stream=io.StringIO())
        else:
            stats.add(profiler)
    return stats


def function_name(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":  # built-in functions and methods
        return name.strip("<>")
    path = Path(filename)
    try:
        location = path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        parts = path.parts
        location = "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else path.name
    return f"{location}:{line} {name}"


# Built-in calls in which a thread waits for another thread, the network or a timer.
WAITING_CALLS = ("acquire' of '_thread.lock", "poll' of 'select.poll", "time.sleep", "select.select", "select.epoll")


def is_waiting(key: tuple[str, int, str]) -> bool:
    return key[0] == "~" and any(call in key[2] for call in WAITING_CALLS)


def waiting_seconds(stats: pstats.Stats) -> float:
    """Self time of all waiting calls, summed over threads."""
    return sum(values[2] for key, values in stats.stats.items() if is_waiting(key))  # type: ignore[attr-defined]


def summary_table(
    stats: pstats.Stats, sort: str = "tottime", limit: int = 12, total_s: float | None = None, skip_waiting: bool = False
) -> Table:
    """Top functions by self time ("tottime") or cumulative time ("cumtime"), in ms."""
    entries = stats.stats  # type: ignore[attr-defined]
    index = 2 if sort == "tottime" else 3
    ranked = sorted(entries.items(), key=lambda item: item[1][index], reverse=True)
    table = Table(["function", "calls", "self ms", "cumulative ms", "share of wall"])
    for key, (_, calls, self_time, cumulative, _) in ranked:
        if len(table.rows) >= limit:
            break
        if skip_waiting and is_waiting(key):
            continue
        if key[2] in ("<module>", "run", "_bootstrap_inner", "_bootstrap") and sort == "cumtime":
            continue
        share = f"{100 * (self_time if sort == 'tottime' else cumulative) / total_s:.0f}%" if total_s else None
        table.add(function_name(key), calls, self_time * 1000, cumulative * 1000, share)
    return table

"""Results of the benchmarks and their Markdown page."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    columns: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)

    def add(self, *values: object) -> None:
        self.rows.append(values)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join(" --- " for _ in self.columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(format_cell(value) for value in row) + " |")
        return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's results: its goal, whether this run met it, tables and notes."""

    title: str
    goal: str
    verdict: str = ""
    tables: list[tuple[str, Table]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, caption: str, columns: Sequence[str]) -> Table:
        table = Table(columns)
        self.tables.append((caption, table))
        return table

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", f"**Goal:** {self.goal}", ""]
        if self.verdict:
            parts += [f"**This run:** {self.verdict}", ""]
        for caption, table in self.tables:
            if caption:
                parts += [caption, ""]
            parts += [table.markdown(), ""]
        for note in self.notes:
            parts += [note, ""]
        return "\n".join(parts)


def format_cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2g}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def median(values: Iterable[float]) -> float | None:
    items = [value for value in values if value is not None]
    return statistics.median(items) if items else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def verdict(met: bool, measured: str, goal: str, shortfall: str = "") -> str:
    """Sentence saying whether ``measured`` meets ``goal``, and by how much it misses."""
    if met:
        return f"met: {measured} (goal {goal})."
    return f"missed: {measured} (goal {goal}){', ' + shortfall if shortfall else ''}."

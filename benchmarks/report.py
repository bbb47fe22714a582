"""Outputs of a sweep (`instdisc scale ...`, `instdisc bench defaults`): one row per
point in ``results.parquet``, the same table in ``results.md``, and line plots."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure


def write_table(rows: list[dict], output: Path, title: str, notes: Iterable[str] = (), columns=None, plots=()):
    """Write ``results.parquet`` (every key of every row) and ``results.md`` (``columns``,
    default all) into `output`; print the markdown and what was written (and `plots`)."""
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), output / "results.parquet")
    (output / "results.md").write_text(text := markdown(rows, title, notes, columns))
    print(text, "wrote " + ", ".join(map(str, [output / "results.parquet", output / "results.md", *plots])), sep="\n")


def markdown(rows: list[dict], title: str, notes: Iterable[str] = (), columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    for floor, spec in ((1e4, ",.0f"), (100, ".1f"), (1, ".2f")):
        if abs(value) >= floor:
            return format(value, spec)
    return format(value, ".2f" if value == 0 else ".3g")


def plot_lines(path: Path, rows: list[dict], x: str, y: str, series=(), title="", ylabel=None, logx=False) -> Path:
    """One line of `y` against `x` per distinct value of `series` (a key or keys)."""
    keys = [series] if isinstance(series, str) else list(series)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get(y) is not None and row.get(x) is not None:
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, members in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        members.sort(key=lambda row: row[x])
        ax.plot([m[x] for m in members], [m[y] for m in members], marker="o", label=", ".join(map(str, label)))
    ax.set(xlabel=x, ylabel=ylabel or y, title=title, xscale="log" if logx else "linear")
    if keys and groups:  # beside the axes, where it cannot hide a line
        ax.legend(title=", ".join(keys), fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path

"""A capacity search's outputs: ``capacity.csv``, the markdown section, the table artifact's
rows and ``capacity.png`` (the highest load that held against context). Data in, files out;
the table itself is ``llmflow.bench.capacity.capacity_table``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from llmflow.bench.capacity import cells_totals
from llmflow.bench.report import STATUS_MARKERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CAPACITY_COLUMNS = (
    "context",
    "output_tokens",
    "dimension",
    "held",
    "failed",
    "verdict",
    "at_max",
    "cells",
    "grid_cells",
    "done",
)
# A marker per verdict of a failing load: the plot's status markers, and the two a capacity
# search adds (missed SLOs; an open-loop cell that could not keep up with its rate).
VERDICT_MARKERS: dict[str, str] = {**STATUS_MARKERS, "slo": "P", "saturated": "^"}


def capacity_records(table: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The rows in ``CAPACITY_COLUMNS`` order (summary.json, the table artifact)."""
    if table is None:
        return None
    return [{col: row.get(col) for col in CAPACITY_COLUMNS} for row in table]


def capacity_frame(table: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(capacity_records(table), columns=list(CAPACITY_COLUMNS))
    if (frame["dimension"] == "concurrency").all():  # whole requests: 4, not 4.0, beside empty cells
        for col in ("held", "failed"):
            frame[col] = pd.to_numeric(frame[col]).round().astype("Int64")
    return frame


def _load(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and pd.isna(x)) else f"{x:g}"


def capacity_markdown(table: list[dict[str, Any]]) -> str:
    """The capacity section of the campaign report: a row per context (and output length), and
    the cells the search ran beside the cells a full grid over the same loads would need."""
    dimension = table[0]["dimension"] if table else "load"
    ran, grid_cells = cells_totals(table)
    lines = [
        "## Capacity",
        "",
        f"| context | output tokens | largest {dimension} held | first failing {dimension} | verdict | cells |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        held = _load(row["held"]) + (" (max)" if row["at_max"] else "")
        verdict = (row["verdict"] or "-") + ("" if row["done"] else " (search not finished)")
        lines.append(
            f"| {row['context']} | {row['output_tokens']} | {held} | {_load(row['failed'])} | {verdict} | {row['cells']} |"
        )
    lines += ["", f"The search ran {ran} cells; a full grid over the same {dimension} values would need {grid_cells}."]
    return "\n".join(lines) + "\n"


def capacity_figure(table: list[dict[str, Any]], title: str) -> Figure:
    """The largest load that held against context (log axis, ticks at the measured sizes), a
    line per output length; above it, the first load that failed, marked with its verdict.
    A context that failed at its first load has no held point, only the failure's marker."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    frame = pd.DataFrame(capacity_records(table), columns=list(CAPACITY_COLUMNS))
    dimension = str(frame["dimension"].iloc[0])
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    several = frame["output_tokens"].nunique() > 1
    handles: list[Line2D] = []
    for i, (out, group) in enumerate(frame.groupby("output_tokens")):
        color = f"C{i % 10}"
        group = group.sort_values("context")
        held = group[group["held"].notna()]
        label = f"largest {dimension} held" + (f", output {out}" if several else "")
        ax.plot(held["context"], held["held"].astype(float), marker="o", color=color, gid=f"held:{out}")
        for _, row in held[held["at_max"].astype(bool)].iterrows():
            ax.annotate(
                "max: held",
                (row["context"], float(row["held"])),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
                color=color,
            )
        handles.append(Line2D([], [], color=color, marker="o", label=label))
        for _, row in group[group["failed"].notna()].iterrows():
            marker = VERDICT_MARKERS.get(str(row["verdict"]), "o")
            ax.plot(
                [row["context"]],
                [float(row["failed"])],
                marker=marker,
                markersize=10,
                linestyle="none",
                color=color,
                gid=f"failed:{row['verdict']}",
            )
            ax.annotate(
                str(row["verdict"]),
                (row["context"], float(row["failed"])),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
                color=color,
            )
    verdicts = sorted({str(v) for v in frame["verdict"].dropna()})
    handles += [
        Line2D([], [], color="black", marker=VERDICT_MARKERS.get(v, "o"), linestyle="none", label=f"first failing: {v}")
        for v in verdicts
    ]
    contexts = sorted(int(c) for c in frame["context"].unique())
    ax.set_xscale("log")
    ax.set_xlim(contexts[0] / 1.25, contexts[-1] * 1.6)  # room for the last context's verdict
    ax.set_xticks(contexts, labels=[str(c) for c in contexts], rotation=45 if len(contexts) > 8 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context (prompt tokens)")
    top = pd.to_numeric(pd.concat([frame["held"], frame["failed"]]), errors="coerce").max()
    ax.set_ylim(0, (float(top) if pd.notna(top) and top > 0 else 1.0) * 1.15)
    ax.set_ylabel(dimension)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="best")
    ran, grid_cells = cells_totals(table)
    fig.suptitle(f"{title}\ncapacity search: {ran} cells (a full grid over the same loads: {grid_cells})")
    return fig


def write_capacity(out_dir: Path, table: list[dict[str, Any]], title: str) -> dict[str, Path]:
    """capacity.csv and capacity.png in ``out_dir`` (no plot for an empty table)."""
    paths = {"capacity": out_dir / "capacity.csv"}
    capacity_frame(table).to_csv(paths["capacity"], index=False)
    if table:
        paths["capacity_plot"] = out_dir / "capacity.png"
        capacity_figure(table, title).savefig(paths["capacity_plot"], dpi=100)
    return paths

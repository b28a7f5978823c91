"""A campaign's outputs: per-request parquet, per-cell summaries, vllm-style JSON, the plot,
the comparison with an earlier campaign, and the markdown report. Data in, files or data out."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from llmflow.bench.compare import describe, read_jsonl_rows, status_regression
from llmflow.bench.compare import note as comparison_note
from llmflow.bench.metrics import METRICS, column_metrics, regression_metrics
from llmflow.results import CellResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CELL_COLUMNS = (
    "key",
    "model",
    "context",
    "concurrency",
    "rate",
    "output_tokens",
    "status",
    "session",
    "requests",
    *(m.name for m in column_metrics()),
    "peak_rss_mib",
    "peak_gpu_mib",
    "model_state",
    "swap_ttft_ms",
    "warm_ttft_ms",
    "reason",
)
# Columns only a campaign over a router's models fills (campaign.models): left out when all empty.
MODEL_COLUMNS = ("model", "model_state", "swap_ttft_ms", "warm_ttft_ms")


def cell_record(cell: CellResult) -> dict[str, Any]:
    """A cell flattened to one row: its identity and verdict, the client summary, the server figures."""
    base = cell.model_dump(exclude={"summary", "server"})
    return {**base, **cell.summary.model_dump(), **cell.server.model_dump()}


def cells_frame(cells: list[CellResult]) -> pd.DataFrame:
    return pd.DataFrame([cell_record(c) for c in cells])


# Counts: the cell's int fields (context, concurrency, output tokens, requests, session) and
# the integer metrics (completed, token totals ...).
INT_COLUMNS = frozenset(
    [name for name, field in CellResult.model_fields.items() if field.annotation is int]
    + [m.name for m in METRICS.values() if m.value_type is int]
)
# Decimals kept in cells.csv and the table artifact: a microsecond for ms, a thousandth of a
# token/s, a KiB for MiB; more digits are noise of the clock, not of the server.
TABLE_DECIMALS = 3


def cells_table(cells: list[CellResult]) -> pd.DataFrame:
    """The cells as people read them (cells.csv, the table artifact): ``CELL_COLUMNS``, counts
    as nullable integers (a skipped cell's empty count would otherwise make every 4 a 4.0),
    other figures rounded to ``TABLE_DECIMALS``."""
    frame = cells_frame(cells)
    frame = frame.reindex(columns=[c for c in CELL_COLUMNS if c in frame.columns])
    frame = frame.drop(columns=[c for c in MODEL_COLUMNS if c in frame.columns and frame[c].isna().all()])
    for col in frame.columns:
        if col in INT_COLUMNS:
            frame[col] = pd.to_numeric(frame[col]).round().astype("Int64")
        elif pd.api.types.is_float_dtype(frame[col]):
            frame[col] = frame[col].round(TABLE_DECIMALS)
    return frame


def table_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of ``cells_table`` as JSON-ready dicts: Python ints and floats, None where empty."""
    return table.astype(object).where(table.notna(), None).to_dict("records")


def vllm_result(cell: CellResult, rows: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """The cell as ``vllm bench serve --save-result`` writes a run: same key names where the
    metric is the same (durations in s, latencies in ms, lists per request).

    Written for every engine, not only vLLM: ``vllm bench serve`` measures any OpenAI-compatible
    server and saves this same file for it, so these files put a llama.cpp or vLLM campaign side
    by side with such runs (and with each other) in the scripts that read them."""
    timed = rows[(rows["cell"] == cell.key) & (~rows["warmup"])] if not rows.empty else rows
    ok = timed[timed["outcome"] == "ok"] if not timed.empty else timed
    per = lambda col: [] if ok.empty else [None if pd.isna(v) else v for v in ok[col].tolist()]  # noqa: E731
    return {
        "date": meta.get("date"),
        "backend": meta.get("engine"),
        "model_id": cell.model or meta.get("model"),
        "tokenizer_id": cell.model or meta.get("model"),
        "num_prompts": cell.requests,
        "request_rate": cell.rate if cell.rate is not None else "inf",
        "max_concurrency": cell.concurrency,
        **cell.summary.model_dump(exclude={"rejected", "crashed", "timed_out", "length_mismatches"}),
        "input_lens": per("prompt_tokens"),
        "output_lens": per("completion_tokens"),
        "ttfts": per("ttft_s"),
        "itls": [] if ok.empty else [list(x) for x in ok["itl_s"]],
        "errors": [] if timed.empty else [e or "" for e in timed["error"].tolist()],
    }


# The plot's panels: three per request, then the cell's throughput with all requests together.
PANELS = (
    ("prefill_tok_per_s", "prefill tok/s per request"),
    ("decode_tok_per_s", "decode tok/s per request"),
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("output_throughput", "output tok/s, all requests of a cell"),
)
# A marker per status that is not ok (every CellStatus but ok; a test holds it to that),
# drawn under zero in every panel at the cell's context.
STATUS_MARKERS: dict[str, str] = {
    "rejected": "x",
    "crashed": "*",
    "timed_out": "v",
    "length_mismatch": "d",
    "skipped": ">",
    "saturated": "^",
    "not_run": "s",
}


# Height of one series' row of status markers, as a fraction of a panel's height.
STATUS_ROW = 0.07


def campaign_figure(cells: pd.DataFrame, title: str) -> Figure:
    """Prefill tok/s, decode tok/s, mean TTFT and the cell's output tok/s against context, one
    line per concurrency (and output length, when there are several; and model, when the
    campaign lists models) through the ok cells; every
    other cell is a marker of its status in a band under zero, a row per line, so survival
    shows too. The x ticks are the contexts the campaign has, not powers of two. Built with the
    plain ``Figure`` API (no pyplot, no GUI backend), so it runs headless and tests can read it."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 8), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    rates = cells["rate"] if "rate" in cells else pd.Series(dtype=float)
    models = cells["model"] if "model" in cells else pd.Series(dtype=object)
    series = list(
        cells.assign(rate=rates, model=models).groupby(["concurrency", "output_tokens", "rate", "model"], dropna=False)
    )
    several_outputs = cells["output_tokens"].nunique() > 1
    colors = [f"C{i % 10}" for i in range(len(series))]
    handles: list[Line2D] = []
    for i, ((conc, out, rate, model), group) in enumerate(series):
        load = f"concurrency {conc}" if pd.isna(rate) else f"{rate:g} req/s (cap {conc})"
        label = ("" if pd.isna(model) else f"{model}: ") + load + (f", output {out}" if several_outputs else "")
        handles.append(Line2D([], [], color=colors[i], marker="o", label=label))
        for ax, (col, _) in zip(axes, PANELS):
            _draw_series(ax, group.sort_values("context"), col, colors[i], STATUS_ROW * (i + 0.5))
    contexts = sorted(int(c) for c in cells["context"].unique())
    shown = [s for s in STATUS_MARKERS if (cells["status"] == s).any()]
    ok = cells[cells["status"] == "ok"]
    for ax, (col, ylabel) in zip(axes, PANELS):
        _context_axis(ax, contexts)
        _value_axis(ax, pd.to_numeric(ok[col], errors="coerce"), STATUS_ROW * len(series) if shown else 0.0)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles += [Line2D([], [], color="black", marker=STATUS_MARKERS[s], linestyle="none", label=s) for s in shown]
    fig.legend(handles=handles, loc="outside right upper")
    fig.suptitle(title)
    return fig


def _draw_series(ax: Axes, group: pd.DataFrame, col: str, color: str, marker_y: float) -> None:
    """One concurrency's ok cells as a line; its other cells as status markers at ``marker_y``
    (a fraction of the panel's height, so the row stays put whatever the data's scale)."""
    ok = group[group["status"] == "ok"]
    ax.plot(ok["context"], pd.to_numeric(ok[col], errors="coerce"), marker="o", color=color)
    for status, failed in group[group["status"] != "ok"].groupby("status"):
        ax.plot(
            failed["context"],
            [marker_y] * len(failed),
            marker=STATUS_MARKERS.get(str(status), "o"),
            linestyle="none",
            markersize=9,
            color=color,
            transform=ax.get_xaxis_transform(),
            gid=f"status:{status}",
        )


def _value_axis(ax: Axes, values: pd.Series, band: float) -> None:
    """Values from zero up (a rate near a floor reads as one); below zero, ``band`` of the
    panel's height is left empty of data for the status markers, without negative ticks."""
    top = float(values.max()) * 1.05 if values.notna().any() and values.max() > 0 else 0.0
    if not top:
        ax.text(0.5, 0.5, "no ok cell has this figure", transform=ax.transAxes, ha="center", color="grey")
    ax.set_ylim(-(top or 1.0) * band / (1 - band), top or 1.0)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= top])
    if band:
        ax.axhline(0, color="grey", linewidth=0.8)


def _context_axis(ax: Axes, contexts: list[int]) -> None:
    """Log-scaled context axis whose ticks and labels are exactly the campaign's contexts."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xlim(contexts[0] / 1.25, contexts[-1] * 1.25)
    ax.set_xticks(contexts, labels=[str(c) for c in contexts], rotation=45 if len(contexts) > 8 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context (prompt tokens)")


def plot(cells: pd.DataFrame, path: Path, title: str) -> Path | None:
    """``campaign_figure`` as a PNG at ``path``; None when there is no cell to draw."""
    if cells.empty:
        return None
    campaign_figure(cells, title).savefig(path, dpi=100)
    return path


def compare(current: list[dict[str, Any]], baseline: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Cells worse than the same cell of ``baseline`` by more than ``threshold`` (relative),
    and cells that ran ok before and do not now: the threshold rule alone, blind to noise
    (``llmflow.bench.compare`` judges a campaign against its baseline's requests)."""
    before = {c["key"]: c for c in baseline}
    found: list[dict[str, Any]] = []
    for cell in current:
        old = before.get(cell["key"])
        if old is None:
            continue
        if old.get("status") == "ok" and cell.get("status") != "ok":
            found.append(status_regression(cell))
            continue
        for metric in regression_metrics():
            a, b = old.get(metric.name), cell.get(metric.name)
            if not _number(a) or not _number(b) or a == 0:
                continue
            change = (b - a) / abs(a)
            worse = change < -threshold if metric.better == "higher" else change > threshold
            if worse:
                found.append(
                    {"key": cell["key"], "metric": metric.name, "baseline": a, "current": b, "change": round(change, 4)}
                )
    return found


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def write_outputs(
    out_dir: Path,
    cells: list[CellResult],
    rows_path: Path,
    meta: dict[str, Any],
    regressions: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """requests.parquet, cells.csv, vllm/<cell>.json, plot.png and summary.json in ``out_dir``;
    returns the ones written (no requests sent: no parquet and no vllm folder). ``extra``: more
    top-level keys of summary.json (a capacity search's table)."""
    rows = read_jsonl_rows(rows_path)
    paths: dict[str, Path] = {}
    if not rows.empty:
        paths["requests"] = out_dir / "requests.parquet"
        rows.to_parquet(paths["requests"], index=False)
    paths["cells"] = out_dir / "cells.csv"
    cells_table(cells).to_csv(paths["cells"], index=False)
    measured = [c for c in cells if c.requests]
    if measured:
        paths["vllm"] = out_dir / "vllm"
        paths["vllm"].mkdir(exist_ok=True)
        for cell in measured:
            (paths["vllm"] / f"{cell.key}.json").write_text(
                json.dumps(vllm_result(cell, rows, meta), indent=1, default=str)
            )
    picture = plot(
        cells_frame(cells), out_dir / "plot.png", f"{meta.get('name')}: {meta.get('engine')} {meta.get('model')}"
    )
    if picture:
        paths["plot"] = picture
    paths["summary"] = out_dir / "summary.json"
    summary = {"meta": meta, "cells": [cell_record(c) for c in cells], "regressions": regressions, **(extra or {})}
    tmp = paths["summary"].with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(paths["summary"])
    return paths


# What ``write_outputs`` may leave in a campaign folder, in the order a reader wants them.
OUTPUT_NAMES = (
    "summary.json",
    "capacity.csv",
    "cells.csv",
    "requests.parquet",
    "capacity.png",
    "plot.png",
    "survival/",
    "vllm/",
)


def output_names(out_dir: Path) -> list[str]:
    """The report files a campaign folder holds (folders with a trailing slash), for a
    ``outputs: DIR (summary.json, ...)`` line that names only what is there."""
    return [name for name in OUTPUT_NAMES if (out_dir / name.rstrip("/")).exists()]


def load_baseline(path: Path) -> list[dict[str, Any]]:
    """The cells of an earlier campaign's summary.json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"campaign.baseline: cannot read {path}: {exc}") from exc
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list):
        raise ValueError(f"campaign.baseline: {path} is not a campaign summary.json (no 'cells' list)")
    return cells


def markdown_report(
    meta: dict[str, Any], cells: list[CellResult], regressions: list[dict[str, Any]], paths: dict[str, Path]
) -> str:
    """The campaign in a page: where and what, one line per cell, regressions, where the files are."""
    shown = [m for m in column_metrics() if m.name != "completed"]  # completed is in ok/sent
    lines = [
        f"# Campaign {meta.get('name')}",
        "",
        f"{meta.get('engine')} serving {meta.get('model')} on {meta.get('placement')} ({meta.get('node')}); "
        f"{meta.get('sessions')} server session(s); finished {meta.get('finished')}.",
        "",
        "| cell | status | ok/sent | "
        + " | ".join(f"{m.name} ({m.unit})" if m.unit else m.name for m in shown)
        + " | peak RSS MiB |",
        "|---|---|---|" + "---|" * len(shown) + "---|",
    ]
    for c in cells:
        row = {**c.summary.model_dump(), **c.server.model_dump()}
        figures = " | ".join(fmt(row[m.name]) for m in shown)
        lines.append(
            f"| {c.key} | {c.status} | {c.summary.completed or 0}/{c.requests} | {figures} | {fmt(c.peak_rss_mib)} |"
        )
    notes = [c for c in cells if c.reason]
    if notes:
        lines += ["", "## Why cells did not run ok", ""] + [
            f"- `{c.key}` ({c.status}): {c.reason.splitlines()[0][:300]}" for c in notes
        ]
    judged = comparison_note(meta.get("comparison"))
    if regressions or judged:
        lines += ["", "## Regressions against the baseline", ""] + ([judged, ""] if judged else [])
        lines += [f"- {describe(r)}" for r in regressions] or ["None."]
    lines += ["", "## Files", ""] + [f"- {name}: `{path}`" for name, path in paths.items()]
    return "\n".join(lines) + "\n"


def fmt(x: Any) -> str:
    """A figure for a report or log line: one decimal, yes/no for a verdict, or '-' when there is none."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:,.1f}" if _number(x) else "-"


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

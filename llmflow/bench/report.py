"""A campaign's outputs: per-request parquet, per-cell summaries, vllm-style JSON, the plot,
the comparison with an earlier campaign, and the markdown report. Data in, files or data out."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from llmflow.bench.metrics import column_metrics, regression_metrics
from llmflow.results import CellResult

CELL_COLUMNS = (
    "key",
    "context",
    "concurrency",
    "output_tokens",
    "status",
    "session",
    "requests",
    *(m.name for m in column_metrics()),
    "peak_rss_mib",
    "peak_gpu_mib",
    "reason",
)


def cell_record(cell: CellResult) -> dict[str, Any]:
    """A cell flattened to one row: its identity and verdict, the client summary, the server figures."""
    base = cell.model_dump(exclude={"summary", "server"})
    return {**base, **cell.summary.model_dump(), **cell.server.model_dump()}


def cells_frame(cells: list[CellResult]) -> pd.DataFrame:
    return pd.DataFrame([cell_record(c) for c in cells])


def read_rows(rows_path: Path) -> pd.DataFrame:
    """requests.jsonl as a frame (empty frame when no request was sent); a torn last line of a
    killed run is dropped."""
    if not rows_path.exists() or rows_path.stat().st_size == 0:
        return pd.DataFrame()
    records = []
    for line in rows_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return pd.DataFrame(records)


def vllm_result(cell: CellResult, rows: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """The cell as ``vllm bench serve --save-result`` writes a run: same key names where the
    metric is the same (durations in s, latencies in ms, lists per request)."""
    timed = rows[(rows["cell"] == cell.key) & (~rows["warmup"])] if not rows.empty else rows
    ok = timed[timed["outcome"] == "ok"] if not timed.empty else timed
    per = lambda col: [] if ok.empty else [None if pd.isna(v) else v for v in ok[col].tolist()]  # noqa: E731
    return {
        "date": meta.get("date"),
        "backend": meta.get("engine"),
        "model_id": meta.get("model"),
        "tokenizer_id": meta.get("model"),
        "num_prompts": cell.requests,
        "request_rate": "inf",
        "max_concurrency": cell.concurrency,
        **cell.summary.model_dump(exclude={"rejected", "crashed", "timed_out", "length_mismatches"}),
        "input_lens": per("prompt_tokens"),
        "output_lens": per("completion_tokens"),
        "ttfts": per("ttft_s"),
        "itls": [] if ok.empty else [list(x) for x in ok["itl_s"]],
        "errors": [] if timed.empty else [e or "" for e in timed["error"].tolist()],
    }


def plot(cells: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Prefill tok/s, decode tok/s and mean TTFT against context size, one line per
    concurrency (and output length, when there are several); only cells that ran ok."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = cells[cells["status"] == "ok"] if not cells.empty else cells
    if ok.empty:
        return None
    several_outputs = ok["output_tokens"].nunique() > 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("prefill_tok_per_s", "prefill tok/s (per request)"),
        ("decode_tok_per_s", "decode tok/s (per request)"),
        ("mean_ttft_ms", "mean TTFT (ms)"),
    )
    for (conc, out), group in ok.groupby(["concurrency", "output_tokens"]):
        group = group.sort_values("context")
        label = f"concurrency {conc}" + (f", output {out}" if several_outputs else "")
        for ax, (col, _) in zip(axes, panels):
            ax.plot(group["context"], group[col], marker="o", label=label)
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(current: list[dict[str, Any]], baseline: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Cells worse than the same cell of ``baseline`` by more than ``threshold`` (relative),
    and cells that ran ok before and do not now."""
    before = {c["key"]: c for c in baseline}
    found: list[dict[str, Any]] = []
    for cell in current:
        old = before.get(cell["key"])
        if old is None:
            continue
        if old.get("status") == "ok" and cell.get("status") != "ok":
            found.append(
                {
                    "key": cell["key"],
                    "metric": "status",
                    "baseline": "ok",
                    "current": cell.get("status"),
                    "change": None,
                }
            )
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
    out_dir: Path, cells: list[CellResult], rows_path: Path, meta: dict[str, Any], regressions: list[dict[str, Any]]
) -> dict[str, Path]:
    """requests.parquet, cells.csv, summary.json, vllm/<cell>.json and plot.png in ``out_dir``."""
    rows = read_rows(rows_path)
    paths: dict[str, Path] = {}
    if not rows.empty:
        paths["requests"] = out_dir / "requests.parquet"
        rows.to_parquet(paths["requests"], index=False)
    frame = cells_frame(cells)
    paths["cells"] = out_dir / "cells.csv"
    frame.reindex(columns=[c for c in CELL_COLUMNS if c in frame.columns]).to_csv(paths["cells"], index=False)
    vdir = out_dir / "vllm"
    vdir.mkdir(exist_ok=True)
    for cell in cells:
        if cell.requests:
            (vdir / f"{cell.key}.json").write_text(json.dumps(vllm_result(cell, rows, meta), indent=1, default=str))
    picture = plot(frame, out_dir / "plot.png", f"{meta.get('name')}: {meta.get('engine')} {meta.get('model')}")
    if picture:
        paths["plot"] = picture
    paths["summary"] = out_dir / "summary.json"
    summary = {"meta": meta, "cells": [cell_record(c) for c in cells], "regressions": regressions}
    tmp = paths["summary"].with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(paths["summary"])
    return paths


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
        "| cell | status | ok/sent | " + " | ".join(f"{m.name} ({m.unit})" for m in shown) + " | peak RSS MiB |",
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
    if regressions:
        lines += ["", "## Regressions against the baseline", ""] + [
            f"- `{r['key']}` {r['metric']}: {r['baseline']} → {r['current']}"
            + (f" ({r['change']:+.1%})" if r["change"] is not None else "")
            for r in regressions
        ]
    lines += ["", "## Files", ""] + [f"- {name}: `{path}`" for name, path in paths.items()]
    return "\n".join(lines) + "\n"


def fmt(x: Any) -> str:
    """A figure for a report or log line: one decimal, or '-' when there is none."""
    return f"{x:,.1f}" if _number(x) else "-"


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

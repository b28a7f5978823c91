"""A campaign over a router tier's models (``campaign.models``), model by model: each model's
survival table (how its cells ended, and the status of each cell by context and load), its
tok/s, and what a swap to it cost (``llmflow.bench.swap``). Data in, data, text or files out."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from llmflow.results import CellResult

SURVIVAL = ("ok", "rejected", "crashed", "timed_out")  # always counted; other statuses when they occur


class SwapCost(BaseModel):
    """Time to first token of the first request to a model that was not loaded, against the same
    request once it was."""

    samples: int = Field(description="Cells that began with the model not loaded and whose probe got its token.")
    swap_ttft_ms: float | None = Field(default=None, description="Median TTFT of the first request, model not loaded.")
    warm_ttft_ms: float | None = Field(default=None, description="Median TTFT of the same request sent again, loaded.")
    cost_ms: float | None = Field(default=None, description="swap_ttft_ms - warm_ttft_ms: what the swap added.")
    max_swap_ttft_ms: float | None = Field(default=None, description="The slowest swap seen.")


class ModelFigures(BaseModel):
    """One model of the campaign."""

    model: str
    cells: int = Field(description="Cells recorded for it (every status).")
    survival: dict[str, int] = Field(
        description="Cells per status: ok, rejected, crashed, timed_out always, other statuses when they occur."
    )
    output_tok_per_s: float | None = Field(
        default=None, description="Completion tokens over duration, pooled over its ok cells."
    )
    prefill_tok_per_s: float | None = Field(default=None, description="Median over its ok cells (per request).")
    decode_tok_per_s: float | None = Field(default=None, description="Median over its ok cells (per request).")
    median_ttft_ms: float | None = Field(default=None, description="Median over its ok cells of their median TTFT.")
    swap: SwapCost


def survival_counts(cells: list[CellResult]) -> dict[str, int]:
    """Cells per status: the four survival outcomes always (0 when none), then any other seen."""
    counts = dict.fromkeys(SURVIVAL, 0)
    for c in cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    return counts


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 3) if found else None


def swap_cost(cells: list[CellResult]) -> SwapCost:
    """The swap figure of ``cells``: medians over the cells whose probe measured a swap."""
    sampled = [c for c in cells if c.swap_ttft_ms is not None]
    swap = _median([c.swap_ttft_ms for c in sampled])
    warm = _median([c.warm_ttft_ms for c in sampled])
    return SwapCost(
        samples=len(sampled),
        swap_ttft_ms=swap,
        warm_ttft_ms=warm,
        cost_ms=round(swap - warm, 3) if swap is not None and warm is not None else None,
        max_swap_ttft_ms=max((c.swap_ttft_ms for c in sampled), default=None),  # type: ignore[type-var]
    )


def model_figures(cells: list[CellResult]) -> list[ModelFigures]:
    """One entry per model, in the order the cells first name them; cells without a model are left out."""
    models = list(dict.fromkeys(c.model for c in cells if c.model is not None))
    figures = []
    for model in models:
        mine = [c for c in cells if c.model == model]
        ok = [c for c in mine if c.status == "ok"]
        duration = sum(c.summary.duration or 0.0 for c in ok)
        tokens = sum(c.summary.total_output_tokens or 0 for c in ok)
        figures.append(
            ModelFigures(
                model=model,
                cells=len(mine),
                survival=survival_counts(mine),
                output_tok_per_s=round(tokens / duration, 3) if duration > 0 else None,
                prefill_tok_per_s=_median([c.summary.prefill_tok_per_s for c in ok]),
                decode_tok_per_s=_median([c.summary.decode_tok_per_s for c in ok]),
                median_ttft_ms=_median([c.summary.median_ttft_ms for c in ok]),
                swap=swap_cost(mine),
            )
        )
    return figures


def load_label(cell: CellResult) -> str:
    """The load a cell ran at, as a survival table's column: ``c4-out8`` or ``r2-c16-out8``."""
    rate = "" if cell.rate is None else f"r{cell.rate:g}-"
    return f"{rate}c{cell.concurrency}-out{cell.output_tokens}"


def survival_table(cells: list[CellResult], model: str) -> pd.DataFrame:
    """``model``'s cells as a table: one row per context, one column per load, each its status."""
    mine = [c for c in cells if c.model == model]
    frame = pd.DataFrame([{"context": c.context, "load": load_label(c), "status": c.status} for c in mine])
    if frame.empty:
        return pd.DataFrame(columns=["context"])
    loads = list(dict.fromkeys(frame["load"]))
    table = frame.pivot(index="context", columns="load", values="status").reindex(columns=loads)
    return table.sort_index().reset_index().rename_axis(columns=None)


def write_survival_tables(out_dir: Path, cells: list[CellResult]) -> dict[str, Path]:
    """``survival/<model>.csv`` per model; nothing when no cell names a model."""
    paths: dict[str, Path] = {}
    for figures in model_figures(cells):
        folder = out_dir / "survival"
        folder.mkdir(exist_ok=True)
        path = folder / f"{figures.model}.csv"
        survival_table(cells, figures.model).to_csv(path, index=False)
        paths[f"survival {figures.model}"] = path
    return paths


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _markdown_table(table: pd.DataFrame) -> list[str]:
    columns = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join("-" if pd.isna(v) else str(v) for v in row) + " |")
    return lines


def models_markdown(cells: list[CellResult]) -> str:
    """The report's per-model part: tok/s and survival counts of each model side by side, the
    swap cost per model, then each model's survival table. Empty when no cell names a model."""
    figures = model_figures(cells)
    if not figures:
        return ""
    statuses = list(dict.fromkeys(s for f in figures for s in f.survival))
    lines = [
        "## Per model",
        "",
        "| model | cells | "
        + " | ".join(statuses)
        + " | output tok/s | prefill tok/s | decode tok/s | median TTFT (ms) |",
        "|---|---|" + "---|" * len(statuses) + "---|---|---|---|",
    ]
    for f in figures:
        counts = " | ".join(str(f.survival.get(s, 0)) for s in statuses)
        lines.append(
            f"| {f.model} | {f.cells} | {counts} | {_fmt(f.output_tok_per_s)} | {_fmt(f.prefill_tok_per_s)} | "
            f"{_fmt(f.decode_tok_per_s)} | {_fmt(f.median_ttft_ms)} |"
        )
    pooled = swap_cost(cells)
    lines += [
        "",
        "## Model swap cost",
        "",
        "TTFT of a 1-token request to a model the router did not have loaded (it evicts the least "
        "recently used when full, then loads it), against the same request sent again at once.",
        "",
        "| model | swaps | swap TTFT (ms, median) | warm TTFT (ms, median) | cost (ms) | slowest swap (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in [(f.model, f.swap) for f in figures] + [("all", pooled)]:
        lines.append(
            f"| {name} | {s.samples} | {_fmt(s.swap_ttft_ms)} | {_fmt(s.warm_ttft_ms)} | {_fmt(s.cost_ms)} | "
            f"{_fmt(s.max_swap_ttft_ms)} |"
        )
    for f in figures:
        counts = ", ".join(f"{n} {s}" for s, n in f.survival.items())
        lines += ["", f"## Survival: {f.model}", "", f"{counts}.", ""] + _markdown_table(survival_table(cells, f.model))
    return "\n".join(lines) + "\n"


def models_summary(cells: list[CellResult]) -> dict:
    """summary.json's ``models`` (per model figures with its survival table's rows) and
    ``swap_cost`` (all models pooled); empty when no cell names a model."""
    figures = model_figures(cells)
    if not figures:
        return {}
    return {
        "models": [
            {
                **f.model_dump(),
                "survival_table": survival_table(cells, f.model)
                .astype(object)
                .where(lambda t: t.notna(), None)
                .to_dict("records"),
            }
            for f in figures
        ],
        "swap_cost": swap_cost(cells).model_dump(),
    }

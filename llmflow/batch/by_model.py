"""A batch's figures per model, for a router that serves several models from one server
(``engine.router``): requests, tokens, tok/s, and how often the router loaded and evicted
each model during the pass. Pure: tallies and counts in, figures and report lines out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from llmflow.engines.figures import TIMING_FIELDS, add_timings, timings_summary
from llmflow.results import BatchReport
from llmflow.router import LoadCounts

NO_MODEL = "(none)"  # a line whose body names no model


@dataclass
class ModelTally:
    """What the client counted for one model's lines during a pass."""

    sent: int = 0
    succeeded: int = 0
    failed_http: int = 0
    unfinished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def add_timings(self, timings: dict) -> None:
        add_timings(self.timings, timings)


class ModelFigures(BaseModel):
    """One model's share of a batch pass."""

    model: str = Field(description="The model the lines named (body.model).")
    sent: int
    succeeded: int
    failed_http: int = Field(description="Answered with an error: a model the router does not have is a 400.")
    unfinished: int
    prompt_tokens: int
    completion_tokens: int
    output_tok_per_s: float = Field(
        description="Its completion tokens over the pass's wall time: its share of the pass's throughput."
    )
    server_timings: dict[str, float] | None = Field(
        default=None, description="Its responses' summed llama-server timings, with its own decode tok/s."
    )
    loads: int | None = Field(default=None, description="Times the router loaded it during the pass; None: unknown.")
    evictions: int | None = Field(default=None, description="Times the router unloaded it during the pass.")
    forced_evictions: int | None = Field(
        default=None, description="Of its evictions, those the router had to kill after its stop timeout (10 s each)."
    )
    failed_loads: int | None = Field(default=None, description="Loads that ended with the child exiting non-zero.")
    load_s_mean: float | None = Field(
        default=None, description="Mean seconds from the router's 'loading' to 'loaded' for it: what a swap to it cost."
    )


class BatchReportByModel(BatchReport):
    """A batch report with a row per model (router mode)."""

    models: list[ModelFigures] = Field(default_factory=list, description="Per model named by the pass's lines.")
    load_counts_from: str | None = Field(
        default=None, description="Where loads and evictions were counted (the router's /models/sse), or None."
    )


def model_figures(tallies: dict[str, ModelTally], wall_s: float) -> list[ModelFigures]:
    """The tallies as figures, by model name."""
    wall = max(wall_s, 1e-9)
    return [
        ModelFigures(
            model=name,
            sent=t.sent,
            succeeded=t.succeeded,
            failed_http=t.failed_http,
            unfinished=t.unfinished,
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            output_tok_per_s=round(t.completion_tokens / wall, 3),
            server_timings=timings_summary(t.timings),
        )
        for name, t in sorted(tallies.items())
    ]


def with_load_counts(figures: list[ModelFigures], counts: dict[str, LoadCounts] | None) -> list[ModelFigures]:
    """The figures with the router's loads and evictions; a model the router cycled that no
    line named gets a row of its own. ``counts`` None (not known) leaves them None."""
    if counts is None:
        return figures
    named = {f.model for f in figures}
    rows = [f.model_copy(update=_load_fields(counts.get(f.model, LoadCounts()))) for f in figures]
    rows += [
        ModelFigures(
            model=name,
            sent=0,
            succeeded=0,
            failed_http=0,
            unfinished=0,
            prompt_tokens=0,
            completion_tokens=0,
            output_tok_per_s=0.0,
            **_load_fields(count),
        )
        for name, count in sorted(counts.items())
        if name not in named
    ]
    return rows


LOAD_COUNTS = ("loads", "evictions", "forced_evictions", "failed_loads")  # LoadCounts' fields a row carries


def _load_fields(count: LoadCounts) -> dict[str, int | float | None]:
    return {**{k: getattr(count, k) for k in LOAD_COUNTS}, "load_s_mean": count.load_s_mean}


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def merge_model_figures(
    first: Iterable[ModelFigures], later: Iterable[ModelFigures], wall_s: float
) -> list[ModelFigures]:
    """Two passes' rows as one (a recovery in between); tok/s over both passes' ``wall_s``."""
    rows: dict[str, ModelFigures] = {}
    for row in [*first, *later]:
        if (have := rows.get(row.model)) is None:
            rows[row.model] = row
            continue
        timings = {
            k: (have.server_timings or {}).get(k, 0.0) + (row.server_timings or {}).get(k, 0.0) for k in TIMING_FIELDS
        }
        rows[row.model] = have.model_copy(
            update={
                **{
                    k: getattr(have, k) + getattr(row, k)
                    for k in ("sent", "succeeded", "failed_http", "prompt_tokens", "completion_tokens")
                },
                "unfinished": row.unfinished,
                "server_timings": timings_summary({k: v for k, v in timings.items() if v}),
                **{k: _add(getattr(have, k), getattr(row, k)) for k in LOAD_COUNTS},
                "load_s_mean": _mean_load(have, row),
            }
        )
    wall = max(wall_s, 1e-9)
    return [
        r.model_copy(update={"output_tok_per_s": round(r.completion_tokens / wall, 3)}) for _, r in sorted(rows.items())
    ]


def _mean_load(a: ModelFigures, b: ModelFigures) -> float | None:
    """Two passes' mean load times, weighted by their loads."""
    timed = [(m.load_s_mean, m.loads or 0) for m in (a, b) if m.load_s_mean is not None]
    loads = sum(n for _, n in timed)
    return round(sum(mean * n for mean, n in timed) / loads, 4) if loads else None


def _cell(value: object) -> str:
    return "?" if value is None else str(value)


def models_markdown(report: BatchReportByModel) -> list[str]:
    """The per-model table of the run's report page."""
    if not report.models:
        return []
    source = f" (loads and evictions from {report.load_counts_from})" if report.load_counts_from else ""
    lines = [
        "",
        f"## Per model{source}",
        "",
        "| model | sent | ok | errors | unfinished | prompt tokens | completion tokens | output tok/s "
        "| server decode tok/s | loads | evictions | mean load s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in report.models:
        decode = (m.server_timings or {}).get("decode_tok_per_s")
        lines.append(
            f"| `{m.model}` | {m.sent} | {m.succeeded} | {m.failed_http} | {m.unfinished} | {m.prompt_tokens} | "
            f"{m.completion_tokens} | {m.output_tok_per_s} | {'' if decode is None else decode} | "
            f"{_cell(m.loads)} | {_cell(m.evictions)} | {_cell(m.load_s_mean)} |"
        )
    return lines

"""Throughput figures of a batch pass: pure arithmetic on a BatchReport."""

from __future__ import annotations

import json
from pathlib import Path

from llmflow.results import BatchReport, TokPS


def merge_reports(first: BatchReport, later: BatchReport) -> BatchReport:
    """Two passes over the same input (a recovery in between) as one report."""
    summed = {
        key: getattr(first, key) + getattr(later, key)
        for key in ("sent", "succeeded", "failed_http", "prompt_tokens", "completion_tokens", "wall_s", "retries")
    }
    # unfinished and invalid lines are whatever the last pass still could not do
    return later.model_copy(update={**summed, "already_done": first.already_done})


def tok_per_s(report: BatchReport, summary_path: Path) -> TokPS:
    """Requests/s and tokens/s over the pass's wall time, from the server's ``usage``.

    Only requests answered this pass count: resumed records took no time now.
    """
    wall = max(report.wall_s, 1e-9)
    answered = report.succeeded + report.failed_http
    return TokPS(
        requests=answered,
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        wall_s=round(report.wall_s, 4),
        requests_per_s=round(answered / wall, 3),
        output_tok_per_s=round(report.completion_tokens / wall, 3),
        total_tok_per_s=round((report.prompt_tokens + report.completion_tokens) / wall, 3),
        summary_path=summary_path,
    )


def write_summary(tokps: TokPS, report: BatchReport, extra: dict | None = None) -> None:
    """The JSON written beside the output: throughput plus the batch counts."""
    data = {
        "throughput": tokps.model_dump(mode="json", exclude={"summary_path"}),
        "batch": report.model_dump(mode="json"),
        **(extra or {}),
    }
    tokps.summary_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tokps.summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(tokps.summary_path)

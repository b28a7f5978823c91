"""Throughput figures of a batch pass: pure arithmetic on a BatchReport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmflow.results import BatchReport, TokPS


SERVER_COUNTERS = {
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "llamacpp:prompt_tokens_total": "prompt_tokens",  # llama-server --metrics
    "llamacpp:tokens_predicted_total": "generation_tokens",
}


def parse_prometheus_counters(text: str, names: dict[str, str] = SERVER_COUNTERS) -> dict[str, float]:
    """Sum each wanted counter over its label sets: ``name{labels} value`` lines of Prometheus text."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric, _, rest = line.partition(" ")
        name = metric.split("{", 1)[0]
        if name in names:
            try:
                value = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
            totals[names[name]] = totals.get(names[name], 0.0) + value
    return totals


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What the server counted during a pass; None when the engine reports nothing."""
    if before is None or after is None:
        return None
    return {key: after[key] - before.get(key, 0.0) for key in after}


TIMING_FIELDS = ("cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms")


def add_timings(sums: dict[str, float], timings: dict[str, Any]) -> None:
    """Add one response's ``timings`` (llama-server) to the running sums."""
    for name in TIMING_FIELDS:
        value = timings.get(name)
        if isinstance(value, (int, float)):
            sums[name] = sums.get(name, 0.0) + value


def timings_summary(sums: dict[str, float]) -> dict[str, float] | None:
    """Summed server timings plus the server's prefill and decode rate per sequence (tokens per
    second of its own processing time; with concurrent slots the aggregate rate is higher)."""
    if not sums:
        return None
    out = {name: round(value, 3) for name, value in sums.items()}
    if sums.get("prompt_ms"):
        out["prefill_tok_per_s"] = round(sums.get("prompt_n", 0.0) / sums["prompt_ms"] * 1000, 3)
    if sums.get("predicted_ms"):
        out["decode_tok_per_s"] = round(sums.get("predicted_n", 0.0) / sums["predicted_ms"] * 1000, 3)
    return out


def merge_reports(first: BatchReport, later: BatchReport) -> BatchReport:
    """Two passes over the same input (a recovery in between) as one report."""
    summed = {
        key: getattr(first, key) + getattr(later, key)
        for key in ("sent", "succeeded", "failed_http", "prompt_tokens", "completion_tokens", "wall_s", "retries")
    }
    server = first.server_counters
    if server is not None and later.server_counters is not None:
        server = {k: server.get(k, 0.0) + later.server_counters.get(k, 0.0) for k in {*server, *later.server_counters}}
    timings = None
    if first.server_timings or later.server_timings:
        timings = timings_summary({
            k: (first.server_timings or {}).get(k, 0.0) + (later.server_timings or {}).get(k, 0.0) for k in TIMING_FIELDS
        })
    # unfinished and invalid lines are whatever the last pass still could not do
    return later.model_copy(
        update={**summed, "already_done": first.already_done, "server_counters": server, "server_timings": timings}
    )


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

"""What a finished batch run tells a person in the Prefect UI: a one-row table and a markdown
report (where it ran, for how long, node- and GPU-hours, tokens, tok/s, failures). Pure: data
in, data out; the flow publishes them as artifacts and as the payload of a Prefect event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmflow.batch.by_model import BatchReportByModel, merge_model_figures, models_markdown
from llmflow.batch.summary import SummaryPass, merge_summary, passes_in
from llmflow.engines.figures import TIMING_FIELDS, timings_summary
from llmflow.results import Allocation, BatchReport, Teardown, TokPS

FINISHED = "finished"
FINISHED_WITH_FAILURES = "finished with failures"
UNFINISHED = "unfinished"


def outcome(report: BatchReport) -> str:
    """``finished``: every line answered 2xx; ``finished with failures``: every line got a final
    answer, but some were errors (or invalid lines); ``unfinished``: a rerun has lines to send."""
    if not report.finished:
        return UNFINISHED
    return FINISHED_WITH_FAILURES if report.with_failures else FINISHED


def failure_warning(report: BatchReport) -> str | None:
    """One sentence when requests were answered with errors: how many, and by which statuses;
    "most" when they were at least half of the answers (a wrong model name, a wrong key)."""
    if not report.failed_http:
        return None
    answered = report.succeeded + report.failed_http
    statuses = ", ".join(f"HTTP {status} x{n}" for status, n in report.failed_statuses.items())
    most = "most requests failed: " if report.failed_http * 2 >= answered else ""
    return (
        f"{most}{report.failed_http} of {answered} answered requests were errors ({statuses}); "
        f"see {report.errors_path}, and rerun with --retry-errors to send them again"
    )


def batch_summary(
    report: BatchReport, tokps: TokPS, allocation: Allocation, teardown: Teardown | None, engine: str, model: str
) -> dict[str, Any]:
    """The run's figures as one flat row (table artifact, event payload)."""
    released = teardown.released_at if teardown else None
    session_s = (released - allocation.started_at).total_seconds() if released else None
    return {
        "run_id": allocation.run_id,
        "placement": allocation.placement,
        "node": allocation.node,
        "job_id": allocation.job_id,
        "engine": engine,
        "model": model,
        "input": str(report.input_path),
        "output": str(report.output_path),
        "outcome": outcome(report),
        "warning": failure_warning(report),
        "input_lines": report.input_lines,
        "already_done": report.already_done,
        "sent": report.sent,
        "succeeded": report.succeeded,
        "failed_http": report.failed_http,
        "failed_statuses": ", ".join(f"{k}: {v}" for k, v in report.failed_statuses.items()) or None,
        "unfinished": report.unfinished,
        "invalid_lines": report.invalid_lines,
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "wall_s": round(report.wall_s, 3),
        "requests_per_s": tokps.requests_per_s,
        "output_tok_per_s": tokps.output_tok_per_s,
        "total_tok_per_s": tokps.total_tok_per_s,
        "session_s": round(session_s, 3) if session_s is not None else None,
        "node_hours": teardown.node_hours if teardown else None,
        "gpu_hours": teardown.gpu_hours if teardown else None,
        **({"models": models_cell(report)} if isinstance(report, BatchReportByModel) else {}),
    }


def models_cell(report: BatchReportByModel) -> str:
    """The per-model figures in one table cell: ``a: 67 ok, 12.3 tok/s, 2 loads, 1 evictions; ...``."""
    return "; ".join(
        f"{m.model}: {m.succeeded} ok, {m.failed_http} errors, {m.output_tok_per_s} tok/s, "
        f"{'?' if m.loads is None else m.loads} loads, {'?' if m.evictions is None else m.evictions} evictions"
        for m in report.models
    )


def batch_markdown(summary: dict[str, Any], report: BatchReport) -> str:
    """A short report for the run's page in the UI."""
    where = f"{summary['placement']} on `{summary['node']}`"
    if summary.get("job_id"):
        where += f" (Slurm job {summary['job_id']})"
    hours = "not counted (not a scheduler allocation)"
    if summary.get("job_id"):
        hours = f"{summary['node_hours']:.4f} node-hours, {summary['gpu_hours']:.4f} GPU-hours"
    lines = [
        f"# Batch run `{summary['run_id']}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| outcome | **{summary['outcome']}** |",
        *([f"| warning | {summary['warning']} |"] if summary.get("warning") else []),
        f"| where | {where} |",
        f"| engine, model | {summary['engine']}, `{summary['model']}` |",
        f"| session | {summary['session_s']} s from allocation to release; batch pass {summary['wall_s']} s |",
        f"| allocation | {hours} |",
        f"| input | `{summary['input']}`: {summary['input_lines']} lines, {summary['already_done']} already done before this run |",
        f"| requests | {summary['sent']} sent, {summary['succeeded']} ok, {summary['failed_http']} answered non-2xx, "
        f"{summary['unfinished']} unfinished, {summary['invalid_lines']} invalid lines |",
        f"| tokens | {summary['prompt_tokens']} prompt, {summary['completion_tokens']} completion |",
        f"| throughput | {summary['requests_per_s']} req/s, {summary['output_tok_per_s']} output tok/s, "
        f"{summary['total_tok_per_s']} total tok/s |",
        f"| output | `{summary['output']}` |",
    ]
    if report.endpoints:
        lines += [
            "",
            f"## Replicas ({report.moved} requests moved to another replica after theirs could not be reached)",
            "",
            "| replica | node | job | restarts | state | replaces | ready after s | answered | moved away | output tok/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {e.name} | {e.node or ''} | {e.job_id or ''} | {e.restarts} | {e.state or ''} | {e.replaces or ''} | "
            f"{'' if e.seconds_to_ready is None else round(e.seconds_to_ready, 1)} | {e.answered} | {e.moved_away} | "
            f"{'' if e.output_tok_per_s is None else e.output_tok_per_s} |"
            for e in report.endpoints
        ]
        lines.append("")
    if report.server_counters:
        counted = ", ".join(f"{k} {v:g}" for k, v in sorted(report.server_counters.items()))
        lines.append(f"| server counters | {counted} |")
    if report.unfinished or report.invalid_lines or report.failed_http:
        lines.append(f"| failures | per line in `{report.errors_path}` |")
    if isinstance(report, BatchReportByModel):
        lines += models_markdown(report)
    return "\n".join(lines) + "\n"


def merge_reports(first: BatchReport, later: BatchReport) -> BatchReport:
    """Two passes over the same input (a recovery in between) as one report."""
    summed = {
        key: getattr(first, key) + getattr(later, key)
        for key in (
            "sent",
            "succeeded",
            "failed_http",
            "prompt_tokens",
            "completion_tokens",
            "wall_s",
            "retries",
            "moved",
        )
    }
    server = first.server_counters
    if server is not None and later.server_counters is not None:
        server = {k: server.get(k, 0.0) + later.server_counters.get(k, 0.0) for k in {*server, *later.server_counters}}
    timings = None
    if first.server_timings or later.server_timings:
        timings = timings_summary(
            {
                k: (first.server_timings or {}).get(k, 0.0) + (later.server_timings or {}).get(k, 0.0)
                for k in TIMING_FIELDS
            }
        )
    statuses = dict(first.failed_statuses)
    for status, n in later.failed_statuses.items():
        statuses[status] = statuses.get(status, 0) + n
    by_model = {}
    if isinstance(first, BatchReportByModel) and isinstance(later, BatchReportByModel):
        by_model = {"models": merge_model_figures(first.models, later.models, summed["wall_s"])}
    # unfinished and invalid lines are whatever the last pass still could not do
    return later.model_copy(
        update={
            **summed,
            "failed_statuses": dict(sorted(statuses.items())),
            "already_done": first.already_done,
            "server_counters": server,
            "server_timings": timings,
            **by_model,
        }
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


def read_summary(path: Path) -> dict | None:
    """The summary file as it is, or None when there is none. One that cannot be read is moved
    aside to ``<name>.unreadable`` (not silently replaced), and the passes start again."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        passes_in(data)
    except (ValueError, TypeError):
        path.replace(path.with_name(path.name + ".unreadable"))
        return None
    return data


def write_summary(tokps: TokPS, report: BatchReport, run_pass: SummaryPass, extra: dict | None = None) -> None:
    """The JSON beside the output: this pass's throughput and batch counts (the keys older
    readers use), plus every pass so far and their total (``llmflow.batch.summary``)."""
    latest = {
        "throughput": tokps.model_dump(mode="json", exclude={"summary_path"}),
        "batch": report.model_dump(mode="json"),
        **(extra or {}),
    }
    existing = read_summary(tokps.summary_path)
    data = merge_summary(existing, latest, run_pass)
    if data is existing:
        return  # a pass that sent nothing: the file stays as it was
    tokps.summary_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tokps.summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(tokps.summary_path)

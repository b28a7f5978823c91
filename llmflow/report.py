"""What a finished batch run tells a person in the Prefect UI: a one-row table and a markdown
report (where it ran, for how long, node- and GPU-hours, tokens, tok/s, failures). Pure: data
in, data out; the flow publishes them as artifacts and as the payload of a Prefect event."""

from __future__ import annotations

from typing import Any

from llmflow.results import Allocation, BatchReport, Teardown, TokPS


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
        "input_lines": report.input_lines,
        "already_done": report.already_done,
        "sent": report.sent,
        "succeeded": report.succeeded,
        "failed_http": report.failed_http,
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
    }


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
    if report.server_counters:
        counted = ", ".join(f"{k} {v:g}" for k, v in sorted(report.server_counters.items()))
        lines.append(f"| server counters | {counted} |")
    if report.unfinished or report.invalid_lines or report.failed_http:
        lines.append(f"| failures | per line in `{report.errors_path}` |")
    return "\n".join(lines) + "\n"

"""``<output>.summary.json`` across passes: each flow run that sent something over the same
output is one pass, kept with its own figures, and ``total`` sums them.

A resumed or retried batch is several passes over one output; rewriting the file with the last
pass alone lost the earlier ones, and a pass that sent nothing wrote zeros over real figures.
The top-level keys (``throughput``, ``batch``, ``placement``...) stay the latest pass's, as
before, for whatever reads them. Pure: dicts in, dicts out; ``report.write_summary`` does the I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from llmflow.results import BatchReport, TokPS


class SummaryPass(BaseModel):
    """One pass's own figures. Times and ids are None for a pass read from an old summary."""

    started_at: datetime | None = Field(default=None, description="The session's allocation.")
    ended_at: datetime | None = Field(default=None, description="When its figures were recorded.")
    flow_run_id: str | None = None
    run_id: str | None = Field(default=None, description="The model session's run id (its run folder).")
    placement: str | None = None
    sent: int
    succeeded: int
    failed_http: int
    unfinished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float
    requests_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float


class SummaryTotal(BaseModel):
    """Every pass together; rates over the passes' summed wall time (time between passes is not counted)."""

    passes: int
    first_started_at: datetime | None
    last_ended_at: datetime | None
    sent: int
    succeeded: int
    failed_http: int
    unfinished: int = Field(description="The latest pass's: what a rerun would still send.")
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    requests_per_s: float | None = Field(description="None while no pass took any time.")
    output_tok_per_s: float | None
    total_tok_per_s: float | None


def pass_of(
    tokps: TokPS,
    report: BatchReport,
    *,
    started_at: datetime | None,
    ended_at: datetime | None,
    flow_run_id: str | None,
    run_id: str | None,
    placement: str | None,
) -> SummaryPass:
    """The figures of the pass just made."""
    return SummaryPass(
        started_at=started_at,
        ended_at=ended_at,
        flow_run_id=flow_run_id,
        run_id=run_id,
        placement=placement,
        sent=report.sent,
        succeeded=report.succeeded,
        failed_http=report.failed_http,
        unfinished=report.unfinished,
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        wall_s=round(report.wall_s, 6),  # unrounded enough that one pass's total has its own rate
        requests_per_s=tokps.requests_per_s,
        output_tok_per_s=tokps.output_tok_per_s,
        total_tok_per_s=tokps.total_tok_per_s,
    )


_OLD_COUNTS = ("sent", "succeeded", "failed_http", "unfinished", "prompt_tokens", "completion_tokens")
_OLD_RATES = ("wall_s", "requests_per_s", "output_tok_per_s", "total_tok_per_s")


def _old_format_pass(existing: dict[str, Any]) -> list[SummaryPass]:
    """A summary written before passes were kept is one pass (none if it sent nothing: the zeros
    a rerun with nothing to send used to write)."""
    batch, throughput = existing.get("batch") or {}, existing.get("throughput") or {}
    try:
        one = SummaryPass(
            run_id=existing.get("run_id"),
            placement=existing.get("placement"),
            **{k: batch[k] for k in _OLD_COUNTS},
            **{k: throughput[k] for k in _OLD_RATES},
        )
    except (KeyError, TypeError, ValidationError):
        return []
    return [one] if one.sent else []


def passes_in(existing: dict[str, Any] | None) -> list[SummaryPass]:
    """The passes a summary file holds: its ``passes`` list, or an old single-pass summary as one."""
    if not existing:
        return []
    if "passes" in existing:
        return [SummaryPass.model_validate(p) for p in existing["passes"]]
    return _old_format_pass(existing)


def _rate(amount: int, wall_s: float) -> float | None:
    return round(amount / wall_s, 3) if wall_s > 0 else None


def total_of(passes: list[SummaryPass]) -> SummaryTotal:
    """The run's total over its passes."""
    wall = sum(p.wall_s for p in passes)
    prompt, completion = sum(p.prompt_tokens for p in passes), sum(p.completion_tokens for p in passes)
    succeeded, failed = sum(p.succeeded for p in passes), sum(p.failed_http for p in passes)
    started = [p.started_at for p in passes if p.started_at]
    ended = [p.ended_at for p in passes if p.ended_at]
    return SummaryTotal(
        passes=len(passes),
        first_started_at=min(started, default=None),
        last_ended_at=max(ended, default=None),
        sent=sum(p.sent for p in passes),
        succeeded=succeeded,
        failed_http=failed,
        unfinished=passes[-1].unfinished if passes else 0,
        prompt_tokens=prompt,
        completion_tokens=completion,
        wall_s=round(wall, 4),
        requests_per_s=_rate(succeeded + failed, wall),
        output_tok_per_s=_rate(completion, wall),
        total_tok_per_s=_rate(prompt + completion, wall),
    )


def _same_pass(a: SummaryPass, b: SummaryPass) -> bool:
    return (a.flow_run_id, a.run_id) == (b.flow_run_id, b.run_id)


def merge_summary(existing: dict[str, Any] | None, latest: dict[str, Any], new: SummaryPass) -> dict[str, Any]:
    """The summary after ``new``: its keys are ``latest`` (this pass's, as before) plus ``passes``
    and ``total``. A pass that sent nothing leaves an existing summary as it was."""
    passes = passes_in(existing)
    if not new.sent and existing:
        return existing
    if new.sent:  # a retried record task replaces its own pass rather than counting it twice
        passes = [p for p in passes if not (new.flow_run_id and _same_pass(p, new))] + [new]
    return {
        **latest,
        "passes": [p.model_dump(mode="json") for p in passes],
        "total": total_of(passes).model_dump(mode="json"),
    }

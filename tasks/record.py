"""Record tok/s: throughput of the batch from the server's usage figures, as JSON beside the output."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from llmflow.batch.jsonl import summary_path_for
from llmflow.batch.report import tok_per_s, write_summary
from llmflow.batch.summary import pass_of
from llmflow.results import Allocation, BatchReport, Ready, TokPS


@task(
    name="record-tok-s",
    retries=2,
    retry_delay_seconds=1,
    timeout_seconds=60,
    persist_result=True,
    cache_policy=NO_CACHE,
)
def record_tok_s(report: BatchReport, allocation: Allocation, ready: Ready) -> TokPS:
    """Compute requests/s and tok/s and add this pass to ``<output>.summary.json`` (earlier
    passes over the same output are kept; see ``llmflow.batch.summary``)."""
    tokps = tok_per_s(report, summary_path_for(report.output_path))
    run_pass = pass_of(
        tokps,
        report,
        started_at=allocation.started_at,
        ended_at=datetime.now(UTC),
        flow_run_id=flow_run.get_id(),
        run_id=allocation.run_id,
        placement=allocation.placement,
    )
    write_summary(
        tokps,
        report,
        run_pass,
        extra={
            "placement": allocation.placement,
            "node": allocation.node,
            "run_id": allocation.run_id,
            "seconds_to_ready": ready.seconds_to_ready,
            "served_models": ready.models,
        },
    )
    return tokps

"""Record tok/s: throughput of the batch from the server's usage figures, as JSON beside the output."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.batch.jsonl import summary_path_for
from llmflow.batch.report import tok_per_s, write_summary
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
    """Compute requests/s and tok/s and write ``<output>.summary.json``."""
    tokps = tok_per_s(report, summary_path_for(report.output_path))
    write_summary(
        tokps,
        report,
        extra={
            "placement": allocation.placement,
            "node": allocation.node,
            "run_id": allocation.run_id,
            "seconds_to_ready": ready.seconds_to_ready,
            "served_models": ready.models,
        },
    )
    return tokps

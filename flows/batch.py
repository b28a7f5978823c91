"""Batch inference flow: one model session, one resumable pass over an OpenAI batch file."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.session import model_session, release_session
from llmflow.config import BatchConfig, SessionConfig
from llmflow.results import BatchReport, TokPS
from tasks import record_tok_s, run_batch_inference


class BatchResult(BaseModel):
    report: BatchReport
    tokps: TokPS


class UnfinishedRequests(RuntimeError):
    """Some requests exhausted their retries; rerunning the same command retries only those."""


@flow(
    name="batch-inference",
    on_crashed=[release_session],
    on_cancellation=[release_session],
    persist_result=True,
)
def batch_inference(session: SessionConfig = SessionConfig(), batch: BatchConfig = BatchConfig()) -> BatchResult:
    """Serve the model, run every request of ``batch.input_path`` once, record tok/s, tear down.

    Finished records are appended to ``batch.output_path`` as they come back, so a rerun after
    any failure sends only what is missing.
    """
    logger = get_run_logger()
    with model_session(session) as s:
        report = run_batch_inference(session, batch, s.handle, s.tunnel)
        tokps = record_tok_s(report, s.allocation, s.ready)
    logger.info(
        "%d requests at %.2f req/s, %.1f output tok/s; summary %s",
        tokps.requests, tokps.requests_per_s, tokps.output_tok_per_s, tokps.summary_path,
    )
    if report.unfinished:
        raise UnfinishedRequests(
            f"{report.unfinished} requests did not finish (see {report.errors_path}); "
            "run the same command again to send only those"
        )
    return BatchResult(report=report, tokps=tokps)

"""Batch inference flow: one model session, one resumable pass over an OpenAI batch file."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.states import Completed, State
from pydantic import BaseModel

from flows.replicas import replica_set
from flows.session import model_session, release_session, with_blocks
from llmflow.batch.jsonl import drop_error_records
from llmflow.batch.report import batch_markdown, batch_summary, failure_warning, merge_reports
from llmflow.config import BatchConfig, SessionConfig
from llmflow.errors import ServerDied, UnfinishedRequests
from llmflow.results import Allocation, BatchReport, Ready, Teardown, TokPS
from tasks import record_tok_s, recover_session, run_batch_inference

FINISHED_WITH_FAILURES_STATE = "Finished with failures"  # a Completed state's name, shown in the UI


class BatchResult(BaseModel):
    report: BatchReport
    tokps: TokPS


def publish_batch_report(
    report: BatchReport, tokps: TokPS, allocation: Allocation, teardown: Teardown | None, session: SessionConfig
) -> dict:
    """Table and markdown artifacts for the UI, and an ``llmflow.batch.finished`` event whose
    payload is the summary, so automations can chain a benchmark or a notification."""
    summary = batch_summary(report, tokps, allocation, teardown, session.engine.kind, session.model.served_name)
    create_table_artifact(table=[summary], key="batch-summary", description=f"batch {report.input_path.name}")
    create_markdown_artifact(
        markdown=batch_markdown(summary, report), key="batch-report", description="batch run report"
    )
    emit_event(
        event="llmflow.batch.finished",
        resource={
            "prefect.resource.id": f"llmflow.batch.{allocation.run_id}",
            "prefect.resource.name": report.output_path.name,
        },
        payload=summary,
    )
    return summary


@flow(
    name="batch-inference",
    on_crashed=[release_session],
    on_cancellation=[release_session],
    persist_result=True,
)
def batch_inference(
    session: SessionConfig = SessionConfig(),
    batch: BatchConfig = BatchConfig(),
    cluster_block: str | None = None,
    model_server_block: str | None = None,
) -> BatchResult | State:
    """Serve the model, run every request of ``batch.input_path`` once, record tok/s, tear down.

    Finished records are appended to ``batch.output_path`` as they come back, so a rerun after
    any failure sends only what is missing.

    Args:
        session: Where and how the model is served (inline).
        batch: The input, the output and how to send the requests.
        cluster_block: Name of a saved Slurm Cluster block; replaces ``session.placement``.
        model_server_block: Name of a saved Model Server block; replaces ``session.engine`` and ``session.model``.
    """
    logger = get_run_logger()
    session = with_blocks(session, cluster_block, model_server_block)
    if batch.retry_errors and (dropped := drop_error_records(batch.output_path)):
        logger.info(
            "retry errors: %d error records taken out of %s; sending those lines again", dropped, batch.output_path
        )
    if session.replicas > 1:
        return _replicated_batch(session, batch)
    with model_session(session) as s:
        report = run_batch_inference(session, batch, s.handle, s.tunnel)
        for _ in range(batch.max_recoveries):
            if not (report.unfinished or report.stopped_early):
                break
            moved = recover_session(session, s.allocation, s.handle)
            if moved is None:
                break  # the same server is still there: the failures were real, not a requeue
            handle, tunnel, ready = moved
            logger.warning(
                "job %s ran again (restart %d); resuming the batch at %s",
                handle.job_id,
                handle.restarts,
                tunnel.base_url,
            )
            s = replace(s, handle=handle, tunnel=tunnel, ready=ready)
            report = merge_reports(report, run_batch_inference(session, batch, s.handle, s.tunnel))
        tokps = record_tok_s(report, s.allocation, s.ready)
    publish_batch_report(report, tokps, s.allocation, s.outcome.get("teardown"), session)
    logger.info(
        "%d requests at %.2f req/s, %.1f output tok/s; summary %s",
        tokps.requests,
        tokps.requests_per_s,
        tokps.output_tok_per_s,
        tokps.summary_path,
    )
    return _finish(report, tokps)


def _replicated_batch(session: SessionConfig, batch: BatchConfig) -> BatchResult | State:
    """The batch spread over ``session.replicas`` servers, lost ones replaced as it runs."""
    logger = get_run_logger()
    started = datetime.now(UTC)
    with replica_set(session) as replicas:
        report = run_batch_inference(session, batch, replicas=replicas)
    report = report.model_copy(update={"endpoints": replicas.figures(report.endpoints)})
    served = [r for r in replicas.replicas.values() if r.ready is not None]
    node_hours, gpu_hours = replicas.hours()
    allocation = Allocation(  # the session as a whole, for the summary row
        placement=session.placement.kind,
        run_id=replicas.set_id,
        node=",".join(sorted({e.node for e in report.endpoints if e.node})),
        run_dir=session.runs_dir,
        job_id=",".join(e.job_id for e in report.endpoints if e.job_id) or None,
        started_at=started,
    )
    teardown = Teardown(
        run_id=replicas.set_id,
        node_hours=round(node_hours, 6),
        gpu_hours=round(gpu_hours, 6),
        released_at=datetime.now(UTC),
    )
    ready = Ready(
        seconds_to_ready=min((r.ready.seconds_to_ready for r in served), default=0.0),
        polls=sum(r.ready.polls for r in served),
        models=served[0].ready.models if served else [],
    )
    tokps = record_tok_s(report, allocation, ready)
    publish_batch_report(report, tokps, allocation, teardown, session)
    for e in report.endpoints:
        logger.info(
            "replica %s (%s, job %s, %s): %d answered, %d moved away",
            e.name, e.node, e.job_id, e.state, e.answered, e.moved_away,
        )  # fmt: skip
    logger.info(
        "%d requests at %.2f req/s over %d replicas (%d replacements, %d requests moved); summary %s",
        tokps.requests,
        tokps.requests_per_s,
        len(report.endpoints),
        replicas.replacements,
        report.moved,
        tokps.summary_path,
    )
    if replicas.gave_up and (report.unfinished or report.stopped_early):
        raise ServerDied(f"{replicas.gave_up}; {report.unfinished} requests did not finish, a rerun sends only those")
    return _finish(report, tokps)


def _finish(report: BatchReport, tokps: TokPS) -> BatchResult | State:
    """The flow's result, ``UnfinishedRequests`` (a rerun resumes) when some lines got no answer,
    or, when every line got one but some were errors or invalid, a Completed state named
    "Finished with failures" (the UI shows the name) that carries the same result."""
    if not report.finished:
        raise UnfinishedRequests(
            f"{report.unfinished} requests did not finish"
            + (" and the endpoint stopped answering, so the rest were not sent" if report.stopped_early else "")
            + f" (see {report.errors_path}); run the same command again to send only what is missing"
        )
    result = BatchResult(report=report, tokps=tokps)
    if report.with_failures:
        warning = failure_warning(report)
        if warning:
            get_run_logger().warning(warning)
        message = f"{report.failed_http} requests answered with an error, {report.invalid_lines} invalid lines"
        return Completed(name=FINISHED_WITH_FAILURES_STATE, message=f"{message}; see {report.errors_path}", data=result)
    return result

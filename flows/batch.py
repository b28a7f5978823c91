"""Batch inference flow: one model session, one resumable pass over an OpenAI batch file."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.states import Completed, State
from pydantic import BaseModel, Field

from flows.replicas import replica_set
from flows.session import model_session, release_session, with_blocks
from llmflow.batch import output_path
from llmflow.batch.embeddings import serve_embeddings
from llmflow.batch.input_check import check_input
from llmflow.batch.jsonl import drop_error_records, errors_path_for, summary_path_for
from llmflow.batch.pending import Pending, count_pending
from llmflow.batch.report import batch_markdown, batch_summary, failure_warning, merge_reports
from llmflow.config import BatchConfig, SessionConfig
from llmflow.errors import ServerDied, UnfinishedRequests
from llmflow.readiness import with_deep_gate
from llmflow.results import Allocation, BatchReport, Ready, Teardown, TokPS
from llmflow.router import is_router
from tasks import record_tok_s, recover_session, run_batch_inference

FINISHED_WITH_FAILURES_STATE = "Finished with failures"  # a Completed state's name, shown in the UI


class BatchResult(BaseModel):
    report: BatchReport
    tokps: TokPS | None = Field(description="This pass's throughput; None when nothing was sent (no pass, no rate).")
    nothing_to_send: bool = Field(
        default=False, description="Every request was already in the output: no server was started, nothing written."
    )


def schedule_timezone(run: FlowRun | None) -> tzinfo:
    """The timezone of the run's deployment schedule, so a run scheduled at 00:30 in Berlin is
    named by its Berlin date; UTC for a run outside a scheduled deployment (CLI, Python, ``batch``)."""
    if run is None or run.deployment_id is None:
        return UTC
    try:
        with get_client(sync_client=True) as client:
            schedules = client.read_deployment(run.deployment_id).schedules
        zones = [s.schedule.timezone for s in schedules if getattr(s.schedule, "timezone", None)]
        return ZoneInfo(zones[0]) if zones else UTC
    except Exception as exc:  # naming the file must not fail the night: UTC, said in the log
        get_run_logger().warning("could not read the deployment's schedule timezone (%s); naming by UTC", exc)
        return UTC


def resolve_output_path(batch: BatchConfig) -> BatchConfig:
    """``batch`` with the placeholders of its output path filled in, once per run, from the flow
    run's *scheduled* start (``{date}``, ``{time}``), name and id; the errors and summary files
    follow the resolved name. Outside a flow run the time is now."""
    run = ctx.flow_run if (ctx := FlowRunContext.get()) else None
    when = (run.expected_start_time if run else None) or datetime.now(UTC)
    uses_clock = {"date", "time"} & set(output_path.placeholders(str(batch.output_path)))
    local = when.astimezone(schedule_timezone(run) if uses_clock else UTC)
    path = output_path.render(batch.output_path, local, run.name if run else None, str(run.id) if run else None)
    if run is not None and path != batch.output_path:
        get_run_logger().info("output %s (from %s; scheduled start %s)", path, batch.output_path, local.isoformat())
    return batch.model_copy(update={"output_path": path})


def nothing_to_send(batch: BatchConfig, pending: Pending) -> State:
    """The run when the output already answers every line: no session, the summary left as it
    was, and a Completed state whose message (and report) says so."""
    message = f"nothing left to send: all {pending.requests} requests of {batch.input_path} are in {batch.output_path}"
    if pending.invalid_lines:
        message += f" ({pending.invalid_lines} invalid input lines are never sent)"
    get_run_logger().info(message)
    report = BatchReport(
        input_path=batch.input_path,
        output_path=batch.output_path,
        errors_path=errors_path_for(batch.output_path),
        input_lines=pending.input_lines,
        already_done=pending.finished,
        sent=0,
        succeeded=0,
        failed_http=0,
        unfinished=0,
        invalid_lines=pending.invalid_lines,
        prompt_tokens=0,
        completion_tokens=0,
        wall_s=0.0,
        retries=0,
    )
    create_markdown_artifact(
        markdown=f"# Nothing left to send\n\n{message}: no server was started, and "
        f"`{summary_path_for(batch.output_path)}` keeps the earlier passes' figures.\n",
        key="batch-report",
        description="batch run report",
    )
    return Completed(message=message, data=BatchResult(report=report, tokps=None, nothing_to_send=True))


def publish_batch_report(
    report: BatchReport, tokps: TokPS, allocation: Allocation, teardown: Teardown | None, session: SessionConfig
) -> dict:
    """Table and markdown artifacts for the UI, and an ``llmflow.batch.finished`` event whose
    payload is the summary, so automations can chain a benchmark or a notification."""
    model = f"router: {session.model.path}" if is_router(session.engine) else session.model.served_name
    summary = batch_summary(report, tokps, allocation, teardown, session.engine.kind, model)
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
    any failure sends only what is missing; a rerun with nothing missing starts no server.
    ``{date}``, ``{time}``, ``{flow_run_name}`` and ``{flow_run_id}`` in the output path are
    filled in from the flow run at its start (``{date}``: the scheduled start's date).

    Args:
        session: Where and how the model is served (inline).
        batch: The input, the output and how to send the requests.
        cluster_block: Name of a saved Slurm Cluster block; replaces ``session.placement``.
        model_server_block: Name of a saved Model Server block; replaces ``session.engine`` and ``session.model``.
    """
    logger = get_run_logger()
    session = with_blocks(session, cluster_block, model_server_block)
    session = with_deep_gate(session, output_tokens=batch.fixed_output_tokens)  # deep gate "auto"
    batch = resolve_output_path(batch)
    check_input(batch.input_path)  # a missing or non-JSONL input fails here, before any server starts
    if batch.retry_errors and (dropped := drop_error_records(batch.output_path)):
        logger.info(
            "retry errors: %d error records taken out of %s; sending those lines again", dropped, batch.output_path
        )
    if not (pending := count_pending(batch.input_path, batch.output_path)).to_send:
        return nothing_to_send(batch, pending)
    session, note = serve_embeddings(session, pending.embeddings_to_send)  # before any server starts
    if note:
        logger.info(note)
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

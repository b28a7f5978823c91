"""Run batch inference: stream the input JSONL through the endpoint, checkpointing each record."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from llmflow import engines
from llmflow.batch import progress
from llmflow.batch.by_model import BatchReportByModel, with_load_counts
from llmflow.batch.client import ReplicaSource, run_batch_sync
from llmflow.config import BatchConfig, SessionConfig
from llmflow.engines.figures import SERVER_COUNTERS, counter_delta, read_counters
from llmflow.results import BatchReport, ServerHandle, Tunnel
from llmflow.router import is_router, swapped_out
from llmflow.router_watch import RouterWatch

LOAD_COUNTS_FROM = "the router's /models/sse state changes"


def server_counters(
    session: SessionConfig, tunnel: Tunnel, handle: ServerHandle, names: dict[str, str] = SERVER_COUNTERS
) -> dict[str, float] | None:
    """The engine's own counters now, or None when it publishes none."""
    return read_counters(engines.spec_for(session.engine).metrics_path, tunnel.base_url, handle.api_key(), names)


@task(
    name="run-batch-inference",
    retries=1,  # a retry resumes from the output file: finished custom_ids are not sent again
    retry_delay_seconds=5,
    timeout_seconds=24 * 3600,
    persist_result=True,
    cache_policy=NO_CACHE,
)
def run_batch_inference(
    session: SessionConfig,
    batch: BatchConfig,
    handle: ServerHandle | None = None,
    tunnel: Tunnel | None = None,
    replicas: ReplicaSource | None = None,
) -> BatchReport:
    """One resumable pass over the input; progress goes to a Prefect artifact and listeners.

    Sends to one server (``handle``, ``tunnel``) or spreads over the ready ``replicas``. A router
    (``engine.router``) gets each line under the model it names, and the report counts per model,
    with the router's loads and evictions during the pass.
    """
    logger = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, description=f"batch {batch.input_path.name}")
    last_update = 0.0

    def report(done: int, total: int) -> None:
        nonlocal last_update
        progress.publish(done, total)
        now = time.monotonic()
        if now - last_update >= 2.0 or done == total:
            last_update = now
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    overrides = (
        engines.spec_for(session.engine).fixed_length_fields(batch.fixed_output_tokens)
        if batch.fixed_output_tokens
        else None
    )
    router = is_router(session.engine)
    if router and batch.rewrite_model_to_served_name:
        logger.info("router mode: lines keep the model they name (rewrite_model_to_served_name does not apply)")
        batch = batch.model_copy(update={"rewrite_model_to_served_name": False})
    if replicas is not None:  # the servers' own counters are per replica; the client's sums cover them all
        result = run_batch_sync(
            batch,
            replicas=replicas,
            body_overrides=overrides,
            served_name=session.model.served_name,
            per_model=router,
            retry_answer=swapped_out if router else None,
            progress=report,
        )
    else:
        assert handle is not None and tunnel is not None
        before = None if router else server_counters(session, tunnel, handle)  # a router's /metrics is per model
        api_key = handle.api_key()
        watch = RouterWatch(tunnel.base_url, api_key).start() if router else None
        try:
            result = run_batch_sync(
                batch,
                tunnel.base_url,
                api_key,
                body_overrides=overrides,
                served_name=session.model.served_name,
                per_model=router,
                retry_answer=swapped_out if router else None,
                progress=report,
            )
        finally:
            if watch is not None:
                watch.stop()
        if watch is not None and isinstance(result, BatchReportByModel):
            if watch.error:
                logger.warning("loads and evictions not counted: %s", watch.error)
            result = result.model_copy(
                update={
                    "models": with_load_counts(result.models, watch.counts()),
                    "load_counts_from": None if watch.error else LOAD_COUNTS_FROM,
                }
            )
        else:
            result = result.model_copy(
                update={"server_counters": counter_delta(before, server_counters(session, tunnel, handle))}
            )
    logger.info(
        "batch pass: %d sent, %d ok, %d non-2xx, %d unfinished, %d invalid lines, %d already done, %d moved; output %s",
        result.sent,
        result.succeeded,
        result.failed_http,
        result.unfinished,
        result.invalid_lines,
        result.already_done,
        result.moved,
        result.output_path,
    )
    for m in getattr(result, "models", []):
        logger.info(
            "model %s: %d sent, %d ok, %d errors, %d completion tokens (%.1f tok/s); loaded %s, evicted %s times",
            m.model, m.sent, m.succeeded, m.failed_http, m.completion_tokens, m.output_tok_per_s, m.loads, m.evictions,
        )  # fmt: skip
        if m.forced_evictions:
            logger.warning(
                "model %s: %d of its evictions were forced: its server ignored the router's stop for the stop "
                "timeout and was killed (each cost that timeout)", m.model, m.forced_evictions,
            )  # fmt: skip
    if result.invalid_lines or result.unfinished:
        logger.warning("per-line errors are in %s", result.errors_path)
    return result

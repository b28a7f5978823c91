"""Recover: after a batch pass stopped on errors, follow a requeued job to its new endpoint."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from llmflow.config import SessionConfig
from llmflow.placements import driver_for
from llmflow.readiness import gate_server
from llmflow.results import Allocation, Ready, ServerHandle, Tunnel


@task(name="recover-session", timeout_seconds=24 * 3600, persist_result=True, cache_policy=NO_CACHE)
def recover_session(
    config: SessionConfig, allocation: Allocation, handle: ServerHandle
) -> tuple[ServerHandle, Tunnel, Ready] | None:
    """None when nothing changed (the server is the same one); raises if it is gone for good.

    Otherwise: the job ran again (requeue, preemption), so wait for its new endpoint, point the
    tunnel at it and pass the health gate again; the caller resumes the batch.
    """
    log = get_run_logger()
    moved = driver_for(config, log=log).recover(allocation, handle)
    if moved is None:
        return None
    new_handle, tunnel = moved
    return new_handle, tunnel, gate_server(config, new_handle, tunnel.base_url, report=log.info)

"""Warm model: start the engine on the node, on a free port, with a per-run API key."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from llmflow.config import SessionConfig
from llmflow.placements import driver_for
from llmflow.results import Allocation, ServerHandle


@task(
    name="warm-model",
    retries=1,  # a port taken between choosing and binding is worth one more start
    retry_delay_seconds=2,
    timeout_seconds=300,
    persist_result=True,
    cache_policy=NO_CACHE,
)
def warm_model(config: SessionConfig, allocation: Allocation) -> ServerHandle:
    """Start the server and return its handle once it has written its endpoint record.

    Loading the weights is the health gate's wait; this step fails fast if the process dies.
    """
    return driver_for(config, log=get_run_logger()).warm(allocation, flow_run_id=flow_run.get_id())

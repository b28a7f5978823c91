"""Open tunnel: make the server reachable from the orchestrator; returns the base URL."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.config import SessionConfig
from llmflow.placements import driver_for
from llmflow.results import ServerHandle, Tunnel


@task(
    name="open-tunnel", retries=2, retry_delay_seconds=2, timeout_seconds=60, persist_result=True, cache_policy=NO_CACHE
)
def open_tunnel(config: SessionConfig, handle: ServerHandle) -> Tunnel:
    """For the local placement the server is reached directly, and this returns its URL."""
    return driver_for(config).tunnel(handle)

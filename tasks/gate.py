"""Health gate: wait for the engine's real readiness signal and one real completion."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.config import SessionConfig
from llmflow.readiness import gate_server
from llmflow.results import Ready, ServerHandle, Tunnel


@task(name="health-gate", timeout_seconds=3600, persist_result=True, cache_policy=NO_CACHE)
def health_gate(config: SessionConfig, handle: ServerHandle, tunnel: Tunnel) -> Ready:
    """No task retries: the wait has its own deadline, and a dead server fails it at once."""
    return gate_server(config, handle, tunnel.base_url)

"""Health gate: wait for the engine's real readiness signal and one real completion."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from llmflow.config import SessionConfig
from llmflow.readiness import gate_server
from llmflow.results import Ready, ServerHandle, Tunnel


@task(name="health-gate", timeout_seconds=3600, persist_result=True, cache_policy=NO_CACHE)
def health_gate(config: SessionConfig, handle: ServerHandle, tunnel: Tunnel) -> Ready:
    """No task retries: the wait has its own deadline, and a dead server fails it at once.
    A progress line every 15 s (what the probe saw, the server log's last line): loading is quiet."""
    return gate_server(config, handle, tunnel.base_url, report=get_run_logger().info)

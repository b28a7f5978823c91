"""Tear down: stop the server (and later close tunnels, cancel jobs); idempotent."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.config import SessionConfig
from llmflow.placements import driver_for
from llmflow.results import Allocation, Teardown


@task(
    name="tear-down", retries=2, retry_delay_seconds=1, timeout_seconds=120, persist_result=True, cache_policy=NO_CACHE
)
def tear_down(config: SessionConfig, allocation: Allocation) -> Teardown:
    """Release everything the allocation holds; a second call reports it already gone."""
    return driver_for(config).teardown(allocation)

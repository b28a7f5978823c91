"""Allocate node: reserve where the server will run (this machine, a Slurm job, a host)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from llmflow.config import SessionConfig
from llmflow.errors import worth_retrying
from llmflow.placements import driver_for
from llmflow.results import Allocation


@task(
    name="allocate-node",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=worth_retrying,  # not a job Slurm refused, a dead server, a bad setting
    timeout_seconds=24 * 3600,  # the real limit is the placement's queue deadline
    persist_result=True,
    cache_policy=NO_CACHE,  # a side effect: never answered from a cache
)
def allocate_node(config: SessionConfig, run_id: str) -> Allocation:
    """Reserve a node for ``run_id``; the run folder is named after it, so a retry reuses it
    (and, for Slurm, finds the job already submitted instead of submitting a second one)."""
    return driver_for(config, log=get_run_logger()).allocate(run_id, flow_run_id=flow_run.get_id())

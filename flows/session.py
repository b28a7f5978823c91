"""The model session every flow shares: allocate → warm → tunnel → gate … tear down.

Teardown is guaranteed three ways: the ``finally`` of ``model_session`` (success, failure,
Ctrl-C, Prefect cancellation in the flow's process), the flows' ``on_crashed`` /
``on_cancellation`` hooks (``release_session``, which finds the run's servers by the flow run
id recorded in their leases), and, for a flow process killed outright, the supervisor's parent
watch plus ``release_leftovers`` at the start of the next session or ``llmflow cleanup``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError  # not re-exported in 3.8.8
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run as current_flow_run

from llmflow import secret_env
from llmflow.config import SessionConfig
from llmflow.errors import NoSuchNodeLimit
from llmflow.placements import driver_for, release_leftovers
from llmflow.results import Allocation, Ready, ServerHandle, Tunnel
from tasks import allocate_node, health_gate, open_tunnel, tear_down, warm_model


def read_secret_block(name: str) -> str:
    """``engine.secret_env``'s ``prefect_secret`` source: the value of a Prefect Secret block."""
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


secret_env.use_block_loader(read_secret_block)


@dataclass(frozen=True)
class Session:
    """A ready model server and how to reach it.

    ``outcome`` is shared by copies made with ``dataclasses.replace`` (after a recovery); the
    session fills in ``outcome["teardown"]`` when it releases the server.
    """

    config: SessionConfig
    allocation: Allocation
    handle: ServerHandle
    tunnel: Tunnel
    ready: Ready
    outcome: dict[str, Any] = field(default_factory=dict)


def new_run_id() -> str:
    """Time-sortable and tied to the flow run, so leftovers can be traced to the run that made them."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run = current_flow_run.get_id()
    return f"{stamp}-{run[:8] if run else secrets.token_hex(4)}"


def with_blocks(
    session: SessionConfig, cluster_block: str | None = None, model_server_block: str | None = None
) -> SessionConfig:
    """The session with a saved Slurm Cluster block as its placement and a saved Model Server
    block as its engine and model, for flows started by block name (from the UI, say)."""
    from blocks import ModelServer, SlurmCluster  # blocks import llmflow.config only

    if cluster_block:
        session = session.model_copy(update={"placement": SlurmCluster.load(cluster_block).placement})
    if model_server_block:
        session = ModelServer.load(model_server_block).apply(session)
    return session


@contextmanager
def node_slot(config: SessionConfig) -> Iterator[None]:
    """Hold one slot of the team's node limit (a Prefect global concurrency limit), if one is set."""
    if config.node_limit is None:
        yield
        return
    try:
        with concurrency(config.node_limit, occupy=1, strict=True, timeout_seconds=config.node_limit_wait_s):
            yield
    except ConcurrencySlotAcquisitionError as exc:
        if "must be created" in str(exc):
            raise NoSuchNodeLimit(
                f"session.node_limit: the Prefect server has no global concurrency limit named {config.node_limit!r}; "
                f"create it with `prefect gcl create {config.node_limit} --limit N`"
            ) from exc
        raise


@contextmanager
def model_session(config: SessionConfig) -> Iterator[Session]:
    """Hold a ready model server for the body of the ``with``; always tear it down after."""
    with node_slot(config):
        with _model_session(config) as session:
            yield session


@contextmanager
def _model_session(config: SessionConfig) -> Iterator[Session]:
    logger = get_run_logger()
    driver = driver_for(config)
    driver.preflight()
    for lease in release_leftovers(config.runs_dir):
        logger.warning("released a server left by a dead run: %s (%s placement)", lease.run_id, lease.placement)
    allocation = allocate_node(config, new_run_id())
    outcome: dict[str, Any] = {}
    logger.info("allocated %s on %s; run folder %s", allocation.run_id, allocation.node, allocation.run_dir)
    try:
        handle = warm_model(config, allocation)
        tunnel = open_tunnel(config, handle)
        ready = health_gate(config, handle, tunnel)
        logger.info("%s ready at %s after %.1fs", handle.engine, tunnel.base_url, ready.seconds_to_ready)
        if handle.workers:
            logger.info(
                "the model is split over %d nodes: head %s, workers %s",
                len(handle.workers) + 1,
                handle.node,
                ", ".join(handle.workers),
            )
        yield Session(config, allocation, handle, tunnel, ready, outcome)
    finally:
        try:
            released = tear_down(config, allocation)
            outcome["teardown"] = released
            if released.not_ours:
                logger.info("tear down: nothing to stop (the endpoint is not ours)")
            else:
                logger.info(
                    "tear down: stopped %s",
                    released.stopped_pids
                    or (f"job {released.cancelled_job}" if released.cancelled_job else "nothing (already gone)"),
                )
            if released.node_hours:
                logger.info("used %.4f node-hours, %.4f GPU-hours", released.node_hours, released.gpu_hours)
        except BaseException:
            # The task machinery can be unavailable while a run is being cancelled or
            # interrupted; the release itself must still happen.
            driver.teardown(allocation)
            raise


def release_session(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook for on_crashed / on_cancellation: release every server of this flow run.

    Runs in the flow's process or in the runner's; either way it only needs the run folder
    (from the flow's parameters) and the flow run id that the leases carry.
    """
    params = flow_run.parameters or {}
    config = SessionConfig.model_validate(params.get("session") or {})
    release_leftovers(config.runs_dir, flow_run_id=str(flow_run.id))

"""N replicas of one model session: brought up side by side, replaced when lost, all released.

Each replica is an ordinary session (allocate → warm → tunnel → gate, the same Prefect tasks)
with its own run id (``<session>-r0``, ``-r1``, …), run folder and lease, so the crash hooks,
``llmflow cleanup`` and the next session's leftover sweep release it like any other run. On
Slurm each replica is its own job, so Slurm places, requeues and cancels them one by one; the
replicas' run folders sit in the session's folder on the cluster, whose ``registry/`` holds one
endpoint record per replica. All replicas share the session's SSH connections to the login node
(``remote.connections.share_connections``).

The batch pool (``llmflow.batch.pool``) learns of a replica once it passed its gate and tells
the set when one stops answering (a hold's ``watch`` thread does the same by probing); the set
then asks the placement whether it is gone and, if so, releases it and starts a replacement (up
to ``max_replacements``) while the others keep working. A replica whose Slurm job nears its
time limit (``successor_lead_s``) gets a successor job; once that is ready the old one is
drained (no new requests, those in flight finish) and cancelled, so no request meets the limit.
``on_change`` listeners (the nginx
gateway) hear the ready replicas' addresses whenever they change. The replicas share one API
key (``SessionConfig.api_key_file``), so one URL in front of them takes one key.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from flows.session import new_run_id, node_slot
from llmflow import readiness
from llmflow.batch.pool import EndpointPool
from llmflow.config import SessionConfig
from llmflow.errors import ServerDied
from llmflow.placements import driver_for, release, release_leftovers
from llmflow.placements.base import make_run_dir, write_secret
from llmflow.remote.connections import close_run, share_connections
from llmflow.remote.leases import read_lease
from llmflow.results import Allocation, EndpointFigures, Ready, ServerHandle, Teardown, Tunnel
from tasks import allocate_node, health_gate, open_tunnel, tear_down, warm_model

# The same tasks, run in the set's worker threads, where Prefect cannot enforce a timeout (it
# warns at each call); the placements' own deadlines (queue, gate) bound each step instead.
# (0: no timeout; with_options reads None as "keep the task's own".)
_warm, _tunnel, _gate, _tear_down = (
    t.with_options(timeout_seconds=0) for t in (warm_model, open_tunnel, health_gate, tear_down)
)
# No retries: a replica that cannot be allocated is replaced by the set, and a retry after the set
# released a half-made replica (its lease gone) would submit a second job.
_allocate = allocate_node.with_options(timeout_seconds=0, retries=0)
HOLD_DRAIN_S = 30.0  # a retiring replica behind the gateway of a hold finishes its requests in this time
CHECK_GRACE_S = 20.0  # a replica whose job is alive gets this long to answer again (an SSH reconnect)


class _Closing(Exception):
    """The set is closing: a bring-up stops between steps."""


@dataclass
class Replica:
    """One server of the set, and where it is in its life."""

    name: str
    config: SessionConfig
    state: str = "starting"  # starting → ready ⇄ checking → lost | failed | draining → retired | released
    replaces: str | None = None  # the replica it was started in place of (lost, or near its time limit)
    successor: str | None = None  # the replica started ahead of this one's time limit
    takes_over: bool = False  # a successor: drain and retire ``replaces`` once this one is ready
    allocation: Allocation | None = None
    handle: ServerHandle | None = None
    tunnel: Tunnel | None = None
    ready: Ready | None = None
    teardown: Teardown | None = None
    error: str | None = None


@dataclass
class ReplicaSet:
    """The replicas of one session; see the module docstring."""

    config: SessionConfig
    set_id: str
    replicas: dict[str, Replica] = field(default_factory=dict)
    replacements: int = 0
    ever_ready: bool = False
    gave_up: str | None = None
    _pools: list[tuple[EndpointPool, asyncio.AbstractEventLoop]] = field(default_factory=list)
    _listeners: list[Callable[[list[str]], None]] = field(default_factory=list)
    _notify_lock: threading.Lock = field(default_factory=threading.Lock)  # listeners hear changes in order
    _futures: list[Future] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _context: contextvars.Context = field(default_factory=contextvars.copy_context)
    log: Any = field(default_factory=lambda: logging.getLogger("llmflow.replicas"))

    def __post_init__(self) -> None:
        n = self.config.replicas + self.config.max_replacements
        self._pool = ThreadPoolExecutor(max_workers=2 * n + 2, thread_name_prefix="llmflow-replica")
        self.replica_config = self._replica_config()

    def _replica_config(self) -> SessionConfig:
        """Each replica's session: its run folder in the set's on the cluster, and the set's key."""
        placement = self.config.placement
        if hasattr(placement, "remote_runs_dir"):
            placement = placement.model_copy(update={"remote_runs_dir": f"{placement.remote_runs_dir}/{self.set_id}"})
        key_file = self.config.api_key_file
        if key_file is None:
            key_file = make_run_dir(self.config.runs_dir, self.set_id) / "api_key"
            write_secret(key_file, secrets.token_urlsafe(32))
        return self.config.model_copy(update={"placement": placement, "api_key_file": key_file})

    @property
    def run_dir(self) -> Path:
        """The set's own folder here (its key, the gateway's files); each replica has its own beside it."""
        return self.config.runs_dir / self.set_id

    def api_key(self) -> str | None:
        key_file = self.replica_config.api_key_file
        return key_file.read_text().strip() if key_file else None

    def _submit(self, fn: Any, *args: Any) -> None:
        """Run ``fn`` in a worker thread inside the flow's context (its tasks join the flow run)."""
        self._futures.append(self._pool.submit(self._context.copy().run, fn, *args))

    # -- bringing replicas up ------------------------------------------------------------------
    def _config_of(self, index: int) -> SessionConfig:
        """Replica ``index``'s session: on the ssh placement with ``hosts``, on its own host."""
        hosts = getattr(self.replica_config.placement, "hosts", None)
        if not hosts:
            return self.replica_config
        placement = self.replica_config.placement.model_copy(update={"login": hosts[index % len(hosts)]})
        return self.replica_config.model_copy(update={"placement": placement})

    def start(self) -> None:
        for i in range(self.config.replicas):
            self._launch(f"{self.set_id}-r{i}", self._config_of(i))

    def _launch(self, name: str, config: SessionConfig, replaces: str | None = None, takes_over: bool = False) -> None:
        with self._lock:
            self.replicas[name] = Replica(name, config, replaces=replaces, takes_over=takes_over)
        if config.placement == self.replica_config.placement:  # one login host: one set of connections
            share_connections(name, self.set_id)
        self._submit(self._bring_up, name)

    def _stop_if_closing(self) -> None:
        if self._closing.is_set():
            raise _Closing

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on a batch's loop; a loop already closed (its pass ended) needs nothing."""
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def _bring_up(self, name: str) -> None:
        replica = self.replicas[name]
        cfg = replica.config
        try:
            replica.allocation = _allocate(cfg, name)
            self._stop_if_closing()
            self.log.info("replica %s allocated on %s", name, replica.allocation.node)
            replica.handle = _warm(cfg, replica.allocation)
            self._stop_if_closing()
            replica.tunnel = _tunnel(cfg, replica.handle)
            self._stop_if_closing()
            replica.ready = _gate(cfg, replica.handle, replica.tunnel)
        except BaseException as exc:  # noqa: BLE001 - a replica that cannot start is replaced, not fatal
            if self._closing.is_set():
                return
            replica.state, replica.error = "failed", f"{type(exc).__name__}: {exc}"
            self.log.warning("replica %s did not come up: %s", name, replica.error)
            self._lost(replica)
            return
        with self._lock:
            if self._closing.is_set():
                return
            replica.state = "ready"
            self.ever_ready = True
            pools = list(self._pools)
        self.log.info(
            "replica %s ready on %s at %s after %.1fs",
            name,
            replica.handle.node,
            replica.tunnel.base_url,
            replica.ready.seconds_to_ready,
        )
        for pool, loop in pools:
            self._post(loop, pool.add, name, replica.tunnel.base_url, replica.handle.api_key())
        self._changed()
        if replica.takes_over and replica.replaces:
            self._retire(replica.replaces)

    # -- who is ready ----------------------------------------------------------------------------
    def on_change(self, fn: Callable[[list[str]], None]) -> None:
        """Call ``fn`` with the ready replicas' host:port (as this machine reaches them) now and on each change."""
        with self._lock:
            self._listeners.append(fn)
        self._changed()

    def upstreams(self) -> list[str]:
        return [r.tunnel.base_url.split("://", 1)[1] for r in self.ready() if r.tunnel]

    def _changed(self) -> None:
        with self._notify_lock:  # snapshot and delivery together: a later change is never overtaken
            with self._lock:
                listeners, upstreams = list(self._listeners), self.upstreams()
            for fn in listeners:
                try:
                    fn(upstreams)
                except Exception as exc:  # noqa: BLE001 - a listener's failure must not stop the replicas
                    self.log.warning("could not tell a listener about the replicas: %s", exc)

    def watch(self, interval_s: float) -> None:
        """Probe every ready replica each ``interval_s`` (a hold, where no batch traffic tells), until closed."""

        def loop() -> None:
            while not self._closing.wait(interval_s):
                for r in self.ready():
                    assert r.tunnel and r.handle
                    if not readiness.answers(r.tunnel.base_url, r.handle, self.config.engine, timeout_s=5.0):
                        self.suspect(r.name)

        threading.Thread(
            target=self._context.copy().run, args=(loop,), name="llmflow-replica-watch", daemon=True
        ).start()

    def ready(self) -> list[Replica]:
        with self._lock:
            return [r for r in self.replicas.values() if r.state == "ready"]

    def wait_ready(self, count: int = 1) -> list[Replica]:
        """Block until ``count`` replicas are ready; raise once the set gave up."""
        while len(ready := self.ready()) < count:
            if self.gave_up:
                raise ServerDied(self.gave_up)
            self._closing.wait(0.2)
        return ready

    # -- time limits ---------------------------------------------------------------------------------
    def watch_time_limits(self) -> None:
        """Start a successor for each ready replica whose job nears its time limit, until closed."""
        interval_s = max(2.0, min(30.0, self.config.successor_lead_s / 4))

        def loop() -> None:
            while not self._closing.wait(interval_s):
                for r in self.ready():
                    if r.successor is not None or r.handle is None:
                        continue
                    try:
                        left = driver_for(r.config).time_left_s(r.handle)
                    except Exception as exc:  # noqa: BLE001 - asked again next round
                        self.log.warning("could not read the time left of %s: %s", r.name, exc)
                        continue
                    if left is not None and left < self.config.successor_lead_s:
                        with self._lock:
                            if self._closing.is_set():
                                return
                            r.successor = f"{self.set_id}-r{len(self.replicas)}"
                            self.log.warning(
                                "replica %s (job %s) has %.0fs left before its time limit; starting %s to take over",
                                r.name, r.handle.job_id, left, r.successor,
                            )  # fmt: skip
                            self._launch(r.successor, r.config, replaces=r.name, takes_over=True)

        threading.Thread(target=self._context.copy().run, args=(loop,), name="llmflow-time-limits", daemon=True).start()

    def _retire(self, name: str) -> None:
        """Drain a replica (no new requests; those in flight finish), then release it."""
        old = self.replicas[name]
        with self._lock:
            if old.state != "ready":
                return  # lost meanwhile (its successor then simply stays), or being checked: the check decides
            old.state = "draining"
            pools = list(self._pools)
        for pool, loop in pools:
            self._post(loop, pool.remove, name)
        self._changed()
        if pools:  # a batch: until its requests on this replica are answered
            deadline = time.monotonic() + 120.0
            while time.monotonic() < deadline and any(
                (ep := pool.endpoints.get(name)) is not None and ep.outstanding > 0 for pool, _ in pools
            ):
                time.sleep(0.2)
        else:  # a hold: nginx sends it nothing new; give what it serves (a long stream) time to end
            self._closing.wait(HOLD_DRAIN_S)
        self.log.info("replica %s drained; releasing it (%s took over)", name, old.successor)
        old.state = "retired"
        self._release(old)

    # -- losing one ----------------------------------------------------------------------------
    def suspect(self, name: str) -> None:
        """From the batch pool (on its loop): this replica stopped answering; look at it."""
        self._submit(self._check, name)

    def _check(self, name: str) -> None:
        replica = self.replicas[name]
        with self._lock:
            if replica.state != "ready" or self._closing.is_set():
                return
            replica.state = "checking"
        self._changed()  # out of the gateway while it is looked at
        assert replica.handle and replica.tunnel
        alive = False
        deadline = time.monotonic() + CHECK_GRACE_S
        try:
            # its job or process is there: give it a while to answer (a dropped SSH connection to
            # the login node is being restarted, and every replica's forward goes through it)
            while not alive and time.monotonic() < deadline and not self._closing.is_set():
                driver_for(replica.config).check_alive(replica.handle)
                alive = readiness.answers(replica.tunnel.base_url, replica.handle, self.config.engine, timeout_s=5.0)
                if not alive:
                    time.sleep(1.0)
        except Exception as exc:  # noqa: BLE001 - ServerDied, or the placement cannot be asked: treat as lost
            replica.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if alive:
            with self._lock:
                if replica.state != "checking":
                    return  # retired or released meanwhile
                replica.state = "ready"
                pools = list(self._pools)
            self.log.info("replica %s answers again; back in rotation", name)
            for pool, loop in pools:
                self._post(loop, pool.restore, name)
            self._changed()
            return
        with self._lock:
            if replica.state != "checking":
                return
            replica.state = "lost"
        self.log.warning("replica %s is lost (%s)", name, replica.error or "not answering")
        self._lost(replica)

    def _lost(self, replica: Replica) -> None:
        """Take a lost replica out, release it, and start its replacement (while any are left)."""
        with self._lock:
            pools = list(self._pools)
        for pool, loop in pools:
            self._post(loop, pool.remove, replica.name)
        self._changed()
        self._release(replica)
        with self._lock:
            if self._closing.is_set():
                return
            if replica.takes_over and replica.replaces:  # a successor that failed: the watch tries again
                old = self.replicas[replica.replaces]
                old.successor = None
                if old.state in ("ready", "checking", "draining"):
                    return  # the replica it was to take over from still serves
            successor = self.replicas.get(replica.successor or "")
            if successor is not None and successor.state in ("starting", "ready"):
                return  # hit its time limit before the successor took over: that one replaces it
            # a replica that failed to start before any ever served says the setup is wrong: replacing
            # it would fail the same way, so only replicas lost after one served are replaced
            replaceable = self.ever_ready or replica.state == "lost"
            if replaceable and self.replacements < self.config.max_replacements:
                self.replacements += 1
                name = f"{self.set_id}-r{len(self.replicas)}"
                self.log.warning("starting replica %s in place of %s", name, replica.name)
                self._launch(name, replica.config, replaces=replica.name)
                return
            if any(r.state in ("starting", "ready", "checking") for r in self.replicas.values()):
                return
            cause = (replica.error or "not answering").splitlines()[0]
            self.gave_up = (
                f"every replica was lost and the {self.config.max_replacements} replacements are used up "
                f"(last: {replica.name}: {cause})"
                if replaceable
                else f"no replica could start (first to fail: {replica.name}: {cause}; its log tail is in the flow's log)"
            )
            pools = list(self._pools)  # a batch may have attached while this one was being released
        self.log.error("%s", self.gave_up)
        for pool, loop in pools:
            self._post(loop, pool.close, self.gave_up)

    def _release(self, replica: Replica) -> None:
        """Stop what the replica holds (its job or process, its forward); idempotent."""
        try:
            if replica.allocation is not None:
                replica.teardown = _tear_down(replica.config, replica.allocation)
            else:  # still queued or starting: what it holds is in its lease
                run_dir = self.config.runs_dir / replica.name
                if (lease := read_lease(run_dir)) is not None:
                    release(run_dir, lease)
        except BaseException as exc:  # noqa: BLE001 - the next sweep (or cleanup) gets it from the lease
            self.log.warning("could not release replica %s: %s", replica.name, exc)
        finally:
            close_run(replica.name)
            if replica.state not in ("lost", "failed", "retired"):
                replica.state = "released"

    # -- the batch's side ----------------------------------------------------------------------
    def attach(self, pool: EndpointPool, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the batch's loop: hand it every ready replica now and each later one."""
        with self._lock:
            self._pools.append((pool, loop))
            ready = [r for r in self.replicas.values() if r.state == "ready"]
            gave_up = self.gave_up
        for r in ready:
            assert r.tunnel and r.handle
            pool.add(r.name, r.tunnel.base_url, r.handle.api_key())
        if gave_up:
            pool.close(gave_up)

    def detach(self, pool: EndpointPool) -> None:
        with self._lock:
            self._pools = [(p, loop) for p, loop in self._pools if p is not pool]

    # -- figures and the end -------------------------------------------------------------------
    def figures(self, served: list[EndpointFigures]) -> list[EndpointFigures]:
        """Per replica: what the batch counted, with where it ran and how it ended."""
        by_name = {f.name: f for f in served}
        rows = []
        for r in self.replicas.values():
            row = by_name.get(r.name) or EndpointFigures(
                name=r.name, answered=0, succeeded=0, prompt_tokens=0, completion_tokens=0, moved_away=0
            )
            rows.append(
                row.model_copy(
                    update={
                        "node": r.handle.node if r.handle else (r.allocation.node if r.allocation else None),
                        "job_id": r.allocation.job_id if r.allocation else None,
                        "seconds_to_ready": r.ready.seconds_to_ready if r.ready else None,
                        "restarts": r.handle.restarts if r.handle else 0,
                        "state": r.state,
                        "replaces": r.replaces,
                    }
                )
            )
        return rows

    def hours(self) -> tuple[float, float]:
        """Summed node-hours and GPU-hours of every replica released so far."""
        done = [r.teardown for r in self.replicas.values() if r.teardown is not None]
        return sum(t.node_hours or 0 for t in done), sum(t.gpu_hours or 0 for t in done)

    def close(self) -> None:
        """Release every replica (those still queued or loading too) and the shared connections."""
        self._closing.set()
        with self._lock:
            pools = list(self._pools)
            self._pools.clear()
        for pool, loop in pools:
            self._post(loop, pool.close, "the session is ending")
        replicas = list(self.replicas.values())
        with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as releasing:
            for r in replicas:
                if r.state not in ("lost", "failed", "retired"):
                    releasing.submit(self._context.copy().run, self._release, r)
        # Bring-ups still running stop at their next step, or when their job or process is gone;
        # one that wrote its lease only now (sbatch was under way) is released here, so none
        # waits out its queue deadline.
        while wait(list(self._futures), timeout=1.0).not_done:
            for r in replicas:
                if read_lease(self.config.runs_dir / r.name) is not None:
                    self._release(r)
        self._pool.shutdown(wait=True)
        for r in replicas:  # a bring-up that was between steps when the set closed
            if read_lease(self.config.runs_dir / r.name) is not None:
                self._release(r)
            close_run(r.name)  # and any connection a late bring-up opened of its own
        close_run(self.set_id)


@contextmanager
def replica_set(config: SessionConfig) -> Iterator[ReplicaSet]:
    """Hold ``config.replicas`` servers for the body of the ``with``; always release them all.

    The body starts at once: replicas join the batch as each passes its gate.
    """
    logger = get_run_logger()
    with node_slot(config):  # one slot for the session; a limit per node is the scheduler's
        driver_for(config).preflight()
        for lease in release_leftovers(config.runs_dir):
            logger.warning("released a server left by a dead run: %s (%s placement)", lease.run_id, lease.placement)
        replicas = ReplicaSet(config, new_run_id(), log=logger)
        logger.info("starting %d replicas (%s-r0…)", config.replicas, replicas.set_id)
        started = datetime.now(UTC)
        try:
            replicas.start()
            replicas.watch_time_limits()
            yield replicas
        finally:
            replicas.close()
            node_hours, gpu_hours = replicas.hours()
            logger.info(
                "released %d replicas (%d replacements) after %.0fs; %.4f node-hours, %.4f GPU-hours",
                len(replicas.replicas),
                replicas.replacements,
                (datetime.now(UTC) - started).total_seconds(),
                node_hours,
                gpu_hours,
            )

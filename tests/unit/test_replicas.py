"""The replica set's bookkeeping, with the lifecycle tasks played by functions that succeed or fail
at once: who is replaced, who takes over, when a batch is told no replica will come.

The real servers, jobs and forwards are in tests/integration/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import flows.replicas as R
from llmflow.batch.pool import EndpointPool, NoReplicaLeft
from llmflow.config import SessionConfig
from llmflow.results import Allocation, Ready, ServerHandle, Tunnel


@pytest.fixture
def fake_tasks(monkeypatch):
    """Replicas whose names end in one of ``failing`` cannot be allocated; the rest come up at once."""
    failing: set[str] = set()

    def allocate(cfg, name):
        if any(name.endswith(suffix) for suffix in failing):
            raise RuntimeError("cannot start")
        return Allocation(
            placement="local", run_id=name, node="n", run_dir=cfg.runs_dir / name, started_at=datetime.now(UTC)
        )

    def warm(cfg, a):
        return ServerHandle(
            engine="llama_cpp", run_id=a.run_id, node="n", host="127.0.0.1", port=1, pid=1, server_pid=1,
            log_path=Path("/dev/null"), served_name="m",
        )  # fmt: skip

    def tunnel(cfg, h):
        return Tunnel(
            base_url=f"http://127.0.0.1:{10000 + int(h.run_id.rsplit('-r', 1)[1])}", local_port=1, forwarded=False
        )

    monkeypatch.setattr(R, "_allocate", allocate)
    monkeypatch.setattr(R, "_warm", warm)
    monkeypatch.setattr(R, "_tunnel", tunnel)
    monkeypatch.setattr(R, "_gate", lambda cfg, h, t: Ready(seconds_to_ready=0.1, polls=1, models=[]))
    return failing


def _set(tmp_path: Path, **config) -> R.ReplicaSet:
    replicas = R.ReplicaSet(SessionConfig(runs_dir=tmp_path, **config), "set")

    def release(r):  # what the real one does to the bookkeeping, without a server to stop
        if r.state not in ("lost", "failed", "retired"):
            r.state = "released"

    replicas._release = release
    return replicas


def _settle(replicas: R.ReplicaSet, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(not f.done() for f in replicas._futures) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_successor_that_cannot_start_does_not_add_a_replica(tmp_path: Path, fake_tasks):
    replicas = _set(tmp_path, replicas=2, max_replacements=2)
    try:
        replicas.start()
        replicas.wait_ready(2)
        fake_tasks.add("-r2")
        with replicas._lock:  # what watch_time_limits does for r0 near its time limit
            r0 = replicas.replicas["set-r0"]
            r0.successor = "set-r2"
            replicas._launch("set-r2", r0.config, replaces="set-r0", takes_over=True)
        _settle(replicas)
        states = {name: r.state for name, r in replicas.replicas.items()}
        assert states == {"set-r0": "ready", "set-r1": "ready", "set-r2": "failed"}
        assert replicas.replacements == 0 and r0.successor is None, "the time-limit watch may try again"
    finally:
        replicas.close()


def test_a_batch_that_attaches_as_the_last_replica_fails_is_told(tmp_path: Path, fake_tasks):
    fake_tasks.add("")  # every replica fails
    replicas = _set(tmp_path, replicas=2, max_replacements=0)
    slow_release = replicas._release

    def release(r):
        time.sleep(0.5)  # a teardown takes a moment; the batch attaches meanwhile
        slow_release(r)

    replicas._release = release

    async def batch() -> str:
        pool = EndpointPool(lambda url, key: None, watcher=replicas)
        await asyncio.sleep(0.2)
        replicas.attach(pool, asyncio.get_running_loop())
        with pytest.raises(NoReplicaLeft, match="no replica could start") as exc:
            await asyncio.wait_for(pool.acquire(), 5)
        return str(exc.value)

    try:
        replicas.start()
        assert "first to fail" in asyncio.run(batch())
    finally:
        replicas.close()


def test_a_lost_replica_is_replaced_and_the_listeners_hear_it(tmp_path: Path, fake_tasks, monkeypatch):
    monkeypatch.setattr(R, "CHECK_GRACE_S", 0.3)
    monkeypatch.setattr(R.readiness, "answers", lambda *a, **k: False)  # r0 stopped answering
    replicas = _set(tmp_path, replicas=2, max_replacements=1)
    heard: list[list[str]] = []
    try:
        replicas.on_change(heard.append)
        replicas.start()
        replicas.wait_ready(2)
        replicas.suspect("set-r0")
        _settle(replicas)
        states = {name: (r.state, r.replaces) for name, r in replicas.replicas.items()}
        assert states == {"set-r0": ("lost", None), "set-r1": ("ready", None), "set-r2": ("ready", "set-r0")}
        assert replicas.replacements == 1
        assert heard[-1] == ["127.0.0.1:10001", "127.0.0.1:10002"]
        assert ["127.0.0.1:10001"] in heard, "r0 left the listeners' list before its replacement joined"
    finally:
        replicas.close()
    assert {r.state for r in replicas.replicas.values()} == {"lost", "released"}

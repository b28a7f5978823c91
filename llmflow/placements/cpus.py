"""Keeping the orchestrator off the model server's CPUs (the local placement's ``server_cpus``).

When client and server share a machine, the orchestrator's own CPU use (the campaign's
streaming client, Prefect's threads) competes with the server. With ``server_cpus`` set, the
server's process group is started on those CPUs, and the orchestrator's process (every
thread of it) is moved to the CPUs left while the session runs, then put back at teardown.
If no CPU would be left, the orchestrator stays where it was and the log says why.

The orchestrator's affinity is process-wide state, so it is kept here per process: several
sessions in one flow keep it off the union of their CPUs, and the last teardown restores it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmflow.errors import ConfigError

FIELD = "placement.server_cpus"

_lock = threading.Lock()
_original: set[int] | None = None  # the process's CPUs before the first session moved it
_held: dict[str, set[int]] = {}  # run id -> its server's CPUs


def cpu_list(cpus: Iterable[int]) -> str:
    """``0-3,5``: the kernel's compact form (``Cpus_allowed_list``)."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a ``Cpus_allowed_list`` (``0-3,5``)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def allowed_cpus(pid: int) -> set[int]:
    """The CPUs process (or thread) ``pid`` may run on, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise ValueError(f"no Cpus_allowed_list in /proc/{pid}/status")


def check_server_cpus(server_cpus: Iterable[int], available: Iterable[int]) -> set[int]:
    """``server_cpus`` as a set; a ``ConfigError`` naming the field if any is not one this
    process may use."""
    server, allowed = set(server_cpus), set(available)
    missing = server - allowed
    if missing:
        raise ConfigError(
            f"{FIELD}: CPU {cpu_list(missing)} is not one this process may use (it may use {cpu_list(allowed)})"
        )
    return server


def orchestrator_cpus(server_cpus: Iterable[int], available: Iterable[int]) -> set[int] | None:
    """The CPUs left to the orchestrator: ``available`` less the server's; None if none is left."""
    rest = set(available) - set(server_cpus)
    return rest or None


def available_cpus() -> set[int]:
    """The CPUs this process may use, as it was before any session moved it."""
    with _lock:
        return set(_original) if _original is not None else os.sched_getaffinity(0)


def set_process_affinity(cpus: set[int]) -> None:
    """Every thread of this process onto ``cpus`` (Linux affinity is per thread; threads
    started later inherit their starter's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # the thread ended meanwhile


def keep_off(run_id: str, server_cpus: Iterable[int], log: Any) -> None:
    """Move this process off ``server_cpus`` for session ``run_id`` (until ``release``)."""
    global _original
    with _lock:
        if _original is None:
            _original = os.sched_getaffinity(0)
        _held[run_id] = set(server_cpus)
        _apply(log)


def release(run_id: str, log: Any) -> None:
    """Session ``run_id`` is over: back to the CPUs the sessions still running leave, or to the
    process's own once none is."""
    with _lock:
        if _held.pop(run_id, None) is None:
            return
        _apply(log)


def _apply(log: Any) -> None:
    global _original
    assert _original is not None
    if not _held:
        set_process_affinity(_original)
        log.info("orchestrator back on CPUs %s", cpu_list(_original))
        _original = None
        return
    taken = set().union(*_held.values())
    rest = orchestrator_cpus(taken, _original)
    if rest is None:
        set_process_affinity(_original)
        log.warning(
            "%s: the server has every CPU this process may use (%s); the orchestrator stays on them",
            FIELD,
            cpu_list(_original),
        )
        return
    set_process_affinity(rest)
    log.info("orchestrator on CPUs %s, off the server's %s", cpu_list(rest), cpu_list(taken))

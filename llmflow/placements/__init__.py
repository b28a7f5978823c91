"""Placements: where the server runs. ``driver_for(config)`` is the driver of the configured
placement (``Driver`` in ``base``); each placement is one module here that registers its driver
under its config's ``kind``, and this package imports them all, so adding a placement is adding
a module (and its config model in ``llmflow.config``).

Leftovers: a run whose flow process died leaves a lease (``remote.leases``); the driver of the
lease's placement releases it, for ``llmflow cleanup``, the crash hooks and the next session.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from llmflow.placements.base import PLACEMENTS, Driver, driver_class, driver_for
from llmflow.registry import import_all
from llmflow.remote.leases import Lease, all_leases, is_leftover, remove_lease

import_all(__name__, __path__, skip=("base", "slurm_jobs"))


def release(run_dir: Path, lease: Lease) -> bool:
    """Stop what the lease holds (process group, job, remote server) and drop it; True if
    something was running."""
    was_alive = driver_class(lease.placement).release_lease(lease)
    remove_lease(run_dir)
    return was_alive


def release_leftovers(runs_dir: Path, flow_run_id: str | None = None) -> list[Lease]:
    """Release leases whose owner died, or every lease of ``flow_run_id`` when given."""
    released = []
    for run_dir, lease in all_leases(runs_dir):
        mine = flow_run_id is not None and lease.flow_run_id == flow_run_id
        if mine or is_leftover(lease):
            release(run_dir, lease)
            released.append(lease)
    return released


def describe(lease: Lease) -> dict[str, object]:
    """A row for ``llmflow cleanup --list``."""
    return {
        "run_id": lease.run_id,
        "placement": lease.placement,
        "pgid": lease.pgid,
        "job_id": lease.job_id,
        "server_alive": driver_class(lease.placement).lease_server_alive(lease),
        "owner_alive": not is_leftover(lease),
        "flow_run_id": lease.flow_run_id,
        "created_at": lease.created_at.isoformat(),
    }


def age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: how long ago, short enough for a table column."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def lease_state(row: dict[str, object]) -> str:
    """What a lease means for its owner: a running session, or a leftover to release."""
    if row["owner_alive"]:
        return "in use (its flow runs)"
    return "leftover, server running" if row["server_alive"] else "leftover, server gone"


def lease_table(rows: list[dict[str, object]], now: datetime | None = None) -> str:
    """``describe`` rows as a text table: run, placement, job or pgid, age, state."""
    if not rows:
        return "no leases: nothing is held"
    now = now or datetime.now(UTC)
    table = [("RUN", "PLACEMENT", "JOB / PGID", "AGE", "STATE")]
    for r in rows:
        held = f"job {r['job_id']}" if r["job_id"] else f"pgid {r['pgid']}" if r["pgid"] else "-"
        started = datetime.fromisoformat(str(r["created_at"]))
        table.append(
            (str(r["run_id"]), str(r["placement"]), held, age((now - started).total_seconds()), lease_state(r))
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


__all__ = [
    "PLACEMENTS",
    "Driver",
    "age",
    "describe",
    "lease_table",
    "driver_class",
    "driver_for",
    "release",
    "release_leftovers",
]

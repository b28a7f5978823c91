"""Leases: a file per live server, so that what a dead run left can be found and released.

A lease is written when a server starts and removed when it is torn down. It names the
process group and the process that owns the session (pid + kernel start time, so a reused
pid is not mistaken for the owner). A lease whose owner is gone is a leftover:
``release_leftovers`` stops its server. The supervisor's own parent watch usually stops
such a server first; leases are the second line, for hooks and ``llmflow cleanup``. How a
lease is released is its placement's business (``llmflow.placements.release``).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llmflow.remote.procs import process_alive, process_start_time

LEASE_FILE = "lease.json"


class Lease(BaseModel):
    run_id: str
    placement: str
    pgid: int | None = Field(
        default=None,
        description="Local and ssh placements: process group of the server and its supervisor (ssh: on the host).",
    )
    job_id: str | None = Field(default=None, description="Slurm placement: the job to cancel.")
    remote_dir: str | None = Field(
        default=None, description="Slurm and ssh placements: the run folder on the remote host."
    )
    placement_config: dict[str, Any] | None = Field(
        default=None, description="How to reach the cluster again (secrets masked, never stored)."
    )
    owner_pid: int
    owner_start: int | None
    flow_run_id: str | None = None
    created_at: datetime


def write_lease(
    run_dir: Path,
    run_id: str,
    placement: str,
    pgid: int | None = None,
    flow_run_id: str | None = None,
    **remote: Any,
) -> Lease:
    lease = Lease(
        run_id=run_id,
        placement=placement,
        pgid=pgid,
        owner_pid=os.getpid(),
        owner_start=process_start_time(os.getpid()),
        flow_run_id=flow_run_id,
        created_at=datetime.now(UTC),
        **remote,
    )
    tmp = run_dir / (LEASE_FILE + ".tmp")
    tmp.write_text(lease.model_dump_json())
    tmp.replace(run_dir / LEASE_FILE)
    return lease


def read_lease(run_dir: Path) -> Lease | None:
    try:
        return Lease.model_validate_json((run_dir / LEASE_FILE).read_text())
    except (OSError, ValueError):
        return None


def remove_lease(run_dir: Path) -> None:
    (run_dir / LEASE_FILE).unlink(missing_ok=True)


def all_leases(runs_dir: Path) -> list[tuple[Path, Lease]]:
    found = []
    for path in sorted(runs_dir.glob(f"*/{LEASE_FILE}")):
        lease = read_lease(path.parent)
        if lease is not None:
            found.append((path.parent, lease))
    return found


def is_leftover(lease: Lease) -> bool:
    """The owner of the session is gone, so nobody will tear this server down."""
    return not process_alive(lease.owner_pid, lease.owner_start)


def dump(rows: list[dict[str, object]]) -> str:
    return json.dumps(rows, indent=2)

"""What every placement shares: run folders, secrets on disk, the supervisor, the failure type."""

from __future__ import annotations

import os
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parent.parent / "node_launcher.py"


class ServerDied(RuntimeError):
    """The server process (or job) ended while we waited on it; carries the log's tail."""


def make_run_dir(runs_dir: Path, run_id: str) -> Path:
    """Private folder (mode 0700) for one session: log, endpoint record, API key, lease."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = runs_dir / run_id
    run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    return run_dir


def write_secret(path: Path, value: str) -> None:
    """Create ``path`` readable by its owner only, before any byte of the secret is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)

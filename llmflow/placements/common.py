"""What every placement shares: run folders, secrets on disk, the supervisor, the failure type."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmflow.config import SSHLogin
    from llmflow.shell import Shell

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


def remote_tail(shell: "Shell", path: str, lines: int = 30) -> str:
    """The last lines of a log on the remote host (for error messages)."""
    res = shell.run(f"tail -n {lines} {shlex.quote(path)} 2>/dev/null")
    return res.stdout.strip() or "(no log yet)"


def check_key_file(login: "SSHLogin | None") -> None:
    """Preflight for SSH placements: a named key file must exist before we try to connect."""
    if login is not None and login.key_file is not None and not login.key_file.expanduser().exists():
        raise ValueError(f"placement.login.key_file: {login.key_file} does not exist")

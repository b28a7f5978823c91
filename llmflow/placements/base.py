"""What every placement shares: run folders, secrets on disk, the supervisor, the failure type,
and (for the remote ones) run folders on the host, log tails and SSH forwards by run id."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from llmflow.remote.shell import SSHShell
from llmflow.remote.start_script import SUPERVISOR
from llmflow.remote.tunnel import LocalForward

if TYPE_CHECKING:
    from llmflow.config import SSHLogin
    from llmflow.remote.shell import Shell

# SSH forwards are process-local objects, kept by run id; each has its own SSH connection
_TUNNEL_SHELLS: dict[str, SSHShell] = {}
_FORWARDS: dict[str, LocalForward] = {}

LAUNCHER = SUPERVISOR  # the supervisor script every placement starts the server under


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


def make_remote_run_dir(shell: "Shell", runs_dir: str, run_id: str, where: str) -> str:
    """Create ``runs_dir/run_id`` (mode 0700) on the remote host; its absolute path."""
    base, rid = shlex.quote(runs_dir), shlex.quote(run_id)
    return shell.run(
        f"mkdir -p {base} && mkdir -p -m 700 {base}/{rid} && cd {base}/{rid} && pwd"
    ).check(f"creating the run folder on the {where}").stdout.strip()


def forward_for(run_id: str, login: "SSHLogin", host: str, port: int) -> LocalForward:
    """The run's forward from 127.0.0.1 to ``host:port`` as seen from the login host: opened on
    first use, pointed at the new address after (a requeued job's new node and port)."""
    forward = _FORWARDS.get(run_id)
    if forward is None:
        tunnel_shell = SSHShell(login)  # its own connection, apart from commands
        _TUNNEL_SHELLS[run_id] = tunnel_shell
        forward = LocalForward(lambda: tunnel_shell.transport, host, port)
        _FORWARDS[run_id] = forward
    else:
        forward.retarget(host, port)
    return forward


def close_forward(run_id: str) -> None:
    """Close the run's forward and its SSH connection, if it has one."""
    if (forward := _FORWARDS.pop(run_id, None)) is not None:
        forward.close()
    if (tunnel_shell := _TUNNEL_SHELLS.pop(run_id, None)) is not None:
        tunnel_shell.close()

"""SSH connections and port forwards of the runs in this process, kept by run id.

They are process-local objects (a socket, a thread), so they live here rather than in a
persisted result; everything a later process needs to clean up is in the run's lease.
Commands and the forward use separate SSH connections, so a long SFTP read never stalls
the forwarded traffic.
"""

from __future__ import annotations

import shutil

from llmflow.config import SSHLogin
from llmflow.remote.shell import Shell, SSHShell, open_shell
from llmflow.remote.tunnel import LocalForward, OpenSSHForward

Forward = LocalForward | OpenSSHForward

_SHELLS: dict[str, Shell] = {}
_TUNNEL_SHELLS: dict[str, SSHShell] = {}
_FORWARDS: dict[str, Forward] = {}


def shell_for(run_id: str, login: SSHLogin | None) -> Shell:
    """The run's command connection (``LocalShell`` when ``login`` is None: we are on the host)."""
    if run_id not in _SHELLS:
        _SHELLS[run_id] = open_shell(login)
    return _SHELLS[run_id]


def uses_openssh(login: SSHLogin) -> bool:
    """Whether ``login.forward`` picks the OpenSSH client (``auto``: when ssh is on PATH)."""
    if login.forward == "auto":
        return shutil.which("ssh") is not None
    return login.forward == "openssh"


def forward_for(run_id: str, login: SSHLogin, host: str, port: int) -> Forward:
    """The run's forward from 127.0.0.1 to ``host:port`` as seen from the login host: opened on
    first use, pointed at the new address after (a requeued job's new node and port)."""
    forward = _FORWARDS.get(run_id)
    if forward is not None:
        forward.retarget(host, port)
    elif uses_openssh(login):
        forward = _FORWARDS[run_id] = OpenSSHForward(login, host, port)
    else:
        tunnel_shell = SSHShell(login)  # its own connection, apart from commands
        _TUNNEL_SHELLS[run_id] = tunnel_shell
        forward = _FORWARDS[run_id] = LocalForward(lambda: tunnel_shell.transport, host, port)
    return forward


def forward_of(run_id: str) -> Forward | None:
    """The run's open forward, if any (tests cut its connection to check reconnects)."""
    return _FORWARDS.get(run_id)


def tunnel_shell_of(run_id: str) -> SSHShell | None:
    return _TUNNEL_SHELLS.get(run_id)


def close_run(run_id: str) -> None:
    """Close the run's forward and both of its SSH connections, if it has them."""
    if (forward := _FORWARDS.pop(run_id, None)) is not None:
        forward.close()
    for shells in (_TUNNEL_SHELLS, _SHELLS):
        if (shell := shells.pop(run_id, None)) is not None:
            shell.close()

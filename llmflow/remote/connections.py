"""SSH connections and port forwards of the runs in this process, kept by run id.

They are process-local objects (a socket, a thread), so they live here rather than in a
persisted result; everything a later process needs to clean up is in the run's lease.
Commands and the forward use separate SSH connections, so a long SFTP read never stalls
the forwarded traffic. The replicas of one session share their session's connections
(``share_connections``): one command connection and one forwarding connection to the login
node, with one forward per replica on it.
"""

from __future__ import annotations

import shutil
import threading

from llmflow.config import SSHLogin
from llmflow.remote.shell import Shell, SSHShell, open_shell
from llmflow.remote.tunnel import ForwardPort, LocalForward, OpenSSHForward

Forward = LocalForward | OpenSSHForward | ForwardPort

_SHELLS: dict[str, Shell] = {}
_TUNNEL_SHELLS: dict[str, SSHShell] = {}
_FORWARDS: dict[str, Forward] = {}
_MASTERS: dict[str, OpenSSHForward] = {}  # a group's forwarding connection, by the group's id
_GROUP: dict[str, str] = {}  # run id -> the id of the group whose connections it uses
_LOCK = threading.RLock()  # replicas come up in threads of their own


def share_connections(run_id: str, group: str) -> None:
    """Let ``run_id`` use the connections of ``group`` (a replica, its session's); ``close_run(group)``
    closes them, ``close_run(run_id)`` only the run's own forward."""
    _GROUP[run_id] = group


def _owner(run_id: str) -> str:
    return _GROUP.get(run_id, run_id)


def shell_for(run_id: str, login: SSHLogin | None) -> Shell:
    """The run's command connection (``LocalShell`` when ``login`` is None: we are on the host)."""
    key = _owner(run_id)
    with _LOCK:
        if key not in _SHELLS:
            _SHELLS[key] = open_shell(login)
        return _SHELLS[key]


def uses_openssh(login: SSHLogin) -> bool:
    """Whether ``login.forward`` picks the OpenSSH client (``auto``: when ssh is on PATH)."""
    if login.forward == "auto":
        return shutil.which("ssh") is not None
    return login.forward == "openssh"


def forward_for(run_id: str, login: SSHLogin, host: str, port: int) -> Forward:
    """The run's forward from 127.0.0.1 to ``host:port`` as seen from the login host: opened on
    first use, pointed at the new address after (a requeued job's new node and port)."""
    with _LOCK:
        return _forward_for(run_id, login, host, port)


def _forward_for(run_id: str, login: SSHLogin, host: str, port: int) -> Forward:
    forward = _FORWARDS.get(run_id)
    group = _owner(run_id)
    if forward is not None:
        forward.retarget(host, port)
    elif uses_openssh(login) and group != run_id:
        master = _MASTERS.get(group)
        if master is None:
            master = _MASTERS[group] = OpenSSHForward(login, host, port)
            forward = ForwardPort(master, host, port, local_port=master.local_port)
        else:
            forward = ForwardPort(master, host, port)
        _FORWARDS[run_id] = forward
    elif uses_openssh(login):
        forward = _FORWARDS[run_id] = OpenSSHForward(login, host, port)
    else:
        if group not in _TUNNEL_SHELLS:
            _TUNNEL_SHELLS[group] = SSHShell(login)  # its own connection, apart from commands
        tunnel_shell = _TUNNEL_SHELLS[group]
        forward = _FORWARDS[run_id] = LocalForward(lambda: tunnel_shell.transport, host, port)
    return forward


def forward_of(run_id: str) -> Forward | None:
    """The run's open forward, if any (tests cut its connection to check reconnects)."""
    return _FORWARDS.get(run_id)


def tunnel_shell_of(run_id: str) -> SSHShell | None:
    return _TUNNEL_SHELLS.get(run_id)


def close_run(run_id: str) -> None:
    """Close the run's forward and both of its SSH connections, if it has them (a run that
    shares a group's connections closes its forward only)."""
    with _LOCK:
        _close_run(run_id)


def _close_run(run_id: str) -> None:
    if (forward := _FORWARDS.pop(run_id, None)) is not None:
        forward.close()
    if _GROUP.pop(run_id, run_id) != run_id:
        return
    if (master := _MASTERS.pop(run_id, None)) is not None:
        master.close()
    for shells in (_TUNNEL_SHELLS, _SHELLS):
        if (shell := shells.pop(run_id, None)) is not None:
            shell.close()

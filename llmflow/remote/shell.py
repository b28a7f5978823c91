"""Run commands and move small files on the login node: here (LocalShell) or over SSH (SSHShell).

SSHShell is paramiko with OpenSSH's habits: Host aliases, User, Port, IdentityFile and
ProxyJump from ``~/.ssh/config``; host keys checked against known_hosts, and an unknown host
refused unless the config opts in (then its key is remembered).
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from llmflow.config import SSHLogin
from llmflow.errors import CommandFailed, ConfigError, HostKeyRejected

DEBUG_ENV = "LLMFLOW_DEBUG"  # "1": show paramiko's own log records (the CLI's --debug sets it)


def quiet_paramiko(debug: bool | None = None) -> None:
    """Keep paramiko's own log records out of the log unless debugging.

    paramiko logs at ERROR what is routine here: a forward's channel refused by a port that is
    not open yet (``Secsh channel 0 open FAILED``), at every start and every requeue; the
    project handles it and says what it waits for. ``debug`` None reads ``LLMFLOW_DEBUG=1``.
    """
    if debug is None:
        debug = os.environ.get(DEBUG_ENV) == "1"
    logging.getLogger("paramiko").setLevel(logging.NOTSET if debug else logging.CRITICAL + 1)


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str

    def check(self, what: str) -> CommandResult:
        if self.rc != 0:
            raise CommandFailed(f"{what} failed (exit {self.rc}): {(self.stderr or self.stdout).strip()[:500]}")
        return self


class Shell(Protocol):
    def run(self, command: str, timeout: float = 60.0) -> CommandResult: ...

    def write_file(self, path: str, data: str, mode: int = 0o600) -> None: ...

    def read_file(self, path: str) -> str | None: ...

    def close(self) -> None: ...


class LocalShell:
    """The flow already runs on the login node: commands run here."""

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd=Path.home())
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def write_file(self, path: str, data: str, mode: int = 0o600) -> None:
        target = Path(path).expanduser() if path.startswith("~") else Path.home() / path
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.chmod(target, mode)

    def read_file(self, path: str) -> str | None:
        target = Path.home() / path
        try:
            return target.read_text()
        except OSError:
            return None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SSHTarget:
    """A login resolved against the SSH config: where to connect, as whom, with which keys."""

    hostname: str
    port: int
    user: str
    key_files: list[str]
    proxy_jump: str | None


def resolve(login: SSHLogin) -> SSHTarget:
    """Apply ``~/.ssh/config`` (if any) under the explicit settings, as ``ssh`` does."""
    cfg: dict = {}
    if login.ssh_config is not None:
        path = login.ssh_config.expanduser()
        if path.exists():
            cfg = paramiko.SSHConfig.from_path(str(path)).lookup(login.host)
    keys = (
        [str(login.key_file.expanduser())]
        if login.key_file
        else [os.path.expanduser(k) for k in cfg.get("identityfile", [])]
    )
    return SSHTarget(
        hostname=cfg.get("hostname", login.host),
        port=login.port or int(cfg.get("port", 22)),
        user=login.user or cfg.get("user") or getpass.getuser(),
        key_files=[k for k in keys if os.path.exists(k)],
        proxy_jump=login.proxy_jump or cfg.get("proxyjump"),
    )


def _parse_jump(spec: str, default_user: str) -> tuple[str, int, str]:
    user, _, hostport = spec.rpartition("@")
    host, _, port = hostport.partition(":")
    return host, int(port or 22), user or default_user


def connect(login: SSHLogin) -> paramiko.SSHClient:
    """An authenticated SSHClient to the login node (through the ProxyJump host if set)."""
    quiet_paramiko()
    target = resolve(login)
    known_hosts = login.known_hosts.expanduser()
    passphrase = login.key_passphrase.get_secret_value() if login.key_passphrase else None

    def client_for() -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if known_hosts.exists():
            client.load_host_keys(str(known_hosts))
        if login.accept_unknown_host_key:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            known_hosts.touch(mode=0o600, exist_ok=True)
            client.load_host_keys(str(known_hosts))  # new keys are saved here
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client

    def open_to(client: paramiko.SSHClient, host: str, port: int, user: str, sock=None) -> None:
        try:
            client.connect(
                host,
                port=port,
                username=user,
                key_filename=target.key_files or None,
                passphrase=passphrase,
                timeout=login.connect_timeout_s,
                banner_timeout=login.connect_timeout_s,
                auth_timeout=login.connect_timeout_s,
                sock=sock,
                look_for_keys=not target.key_files,
            )
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyRejected(
                    f"the host key of {host}:{port} is not in {known_hosts}: refusing to connect. Check the key "
                    f"with the cluster's admins, add it (ssh-keyscan -p {port} {host} >> {known_hosts}), or set "
                    "placement.login.accept_unknown_host_key=true to trust it on first use"
                ) from exc
            raise

    sock = None
    if target.proxy_jump:
        jump_host, jump_port, jump_user = _parse_jump(target.proxy_jump, target.user)
        jump = client_for()
        open_to(jump, jump_host, jump_port, jump_user)
        sock = jump.get_transport().open_channel("direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0))
    client = client_for()
    open_to(client, target.hostname, target.port, target.user, sock=sock)
    if login.accept_unknown_host_key:
        client.save_host_keys(str(known_hosts))
    return client


class SSHShell:
    """Commands and files on the login node over one SSH connection; reconnects when it dropped."""

    def __init__(self, login: SSHLogin) -> None:
        self.login = login
        self._client = connect(login)
        self._lock = threading.Lock()  # replicas' threads share one connection: reconnect once

    @property
    def transport(self) -> paramiko.Transport:
        with self._lock:
            transport = self._client.get_transport()
            if transport is None or not transport.is_active():
                self.reconnect()
                transport = self._client.get_transport()
        assert transport is not None
        return transport

    def reconnect(self) -> None:
        self._client.close()
        self._client = connect(self.login)

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        self.transport  # reconnect first if the connection dropped  # noqa: B018
        _, out, err = self._client.exec_command(command, timeout=timeout)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        return CommandResult(out.channel.recv_exit_status(), stdout, stderr)

    def write_file(self, path: str, data: str, mode: int = 0o600) -> None:
        with self._client.open_sftp() as sftp:
            with sftp.open(path, "w") as f:
                f.chmod(mode)  # before the first byte: the content is never readable by others
                f.write(data)

    def read_file(self, path: str) -> str | None:
        try:
            with self._client.open_sftp() as sftp, sftp.open(path, "r") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return None

    def close(self) -> None:
        self._client.close()


def open_shell(login: SSHLogin | None) -> Shell:
    return SSHShell(login) if login is not None else LocalShell()


def check_key_file(login: SSHLogin | None) -> None:
    """Preflight for SSH placements: a named key file must exist before we try to connect."""
    if login is not None and login.key_file is not None and not login.key_file.expanduser().exists():
        raise ConfigError(f"placement.login.key_file: {login.key_file} does not exist")


def remote_tail(shell: Shell, path: str, lines: int = 30) -> str:
    """The last lines of a log on the remote host (for error messages)."""
    res = shell.run(f"tail -n {lines} {shlex.quote(path)} 2>/dev/null")
    return res.stdout.strip() or "(no log yet)"


def make_remote_run_dir(shell: Shell, runs_dir: str, run_id: str, where: str) -> str:
    """Create ``runs_dir/run_id`` (mode 0700) on the remote host; its absolute path."""
    base, rid = shlex.quote(runs_dir), shlex.quote(run_id)
    return (
        shell.run(f"mkdir -p {base} && mkdir -p -m 700 {base}/{rid} && cd {base}/{rid} && pwd")
        .check(f"creating the run folder on the {where}")
        .stdout.strip()
    )

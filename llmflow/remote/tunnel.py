"""Local port forwards through the login node (``ssh -L``): 127.0.0.1:<free port> -> node:port.

Two implementations with one interface (``local_port``, ``bind_address``, ``retarget``,
``close``): ``OpenSSHForward`` runs the OpenSSH client (the default, where ``ssh`` is
installed: its data path is C), ``LocalForward`` is in-process paramiko (no ``ssh`` binary
needed). Both listen on 127.0.0.1 only, verify host keys, reconnect a dropped SSH connection,
and move to a new node:port on ``retarget`` (a requeued job) without changing the local URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from llmflow import orphans
from llmflow.config import SSHLogin
from llmflow.errors import CommandFailed, HostKeyRejected
from llmflow.remote.shell import resolve

log = logging.getLogger(__name__)


class LocalForward:
    """127.0.0.1:<free port> -> (paramiko, a thread per connection) -> node:port.

    Each accepted connection gets its own ``direct-tcpip`` channel through the SSH transport;
    if the connection to the login node dropped, the next connection reconnects it.
    """

    def __init__(self, transport: Callable[[], paramiko.Transport], node: str, port: int) -> None:
        self._transport = transport
        self.target = (node, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.local_port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._accept = threading.Thread(target=self._accept_loop, name=f"forward-{self.local_port}", daemon=True)
        self._accept.start()

    @property
    def bind_address(self) -> tuple[str, int]:
        return self._sock.getsockname()

    def retarget(self, node: str, port: int) -> None:
        self.target = (node, port)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def _open_channel(self, peer: tuple[str, int]) -> paramiko.Channel:
        try:
            return self._transport().open_channel("direct-tcpip", self.target, peer, timeout=20)
        except paramiko.ChannelException:
            raise  # the far side refused: nothing listens there yet; a new connection will not help
        except (paramiko.SSHException, EOFError, OSError):
            # one retry: ``transport()`` reconnects a dropped SSH connection
            return self._transport().open_channel("direct-tcpip", self.target, peer, timeout=20)

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            channel = self._open_channel(peer)
        except paramiko.ChannelException as exc:
            # routine while a server starts or a requeued job comes back: the gate says what it waits for
            log.debug("forward to %s:%s refused: %s", *self.target, exc)
            client.close()
            return
        except Exception as exc:  # noqa: BLE001 - the client sees a closed connection and retries
            log.warning("forward to %s:%s failed: %s", *self.target, exc)
            client.close()
            return
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([client, channel], [], [], 1.0)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    channel.sendall(data)
                if channel in ready:
                    data = channel.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # either side went away (the SSH connection may be closing with the forward)
        finally:
            try:
                channel.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # its transport is already gone: nothing left to tell the far side
            client.close()

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.close()
        except OSError:
            pass


class OpenSSHForward:
    """127.0.0.1:<free port> -> (the OpenSSH client, one master connection) -> node:port.

    The forward is ``ssh -M -tt -L``: OpenSSH's own C data path (benchmarks/tunnel_throughput.py
    measures it beside a direct connection, plain ``ssh -N -L`` and the paramiko forward).
    The master's control socket (in a private temporary folder) lets ``retarget`` move the
    forward to a new node:port without changing the local port, and a watcher thread starts
    the master again, on the same port, when its connection drops. Host keys are checked
    against ``login.known_hosts`` as OpenSSH does (``accept_unknown_host_key`` means
    ``accept-new``); a key passphrase reaches ssh through an askpass helper that reads it from
    ssh's own environment, never from a command line or a file.
    """

    def __init__(self, login: SSHLogin, node: str, port: int, ssh: str = "ssh") -> None:
        self.login = login
        self._resolved = resolve(login)  # the ssh config is read once, not at every control command
        self.target = (node, port)
        self._extra: dict[int, tuple[str, int]] = {}  # more forwards on this connection (``add``)
        self._primary = True  # whether the first forward (``local_port`` -> ``target``) is still wanted
        self._ssh = ssh
        # 0700: control socket, askpass helper, ssh's log; /tmp when $TMPDIR is too long for a socket path
        base = None if len(tempfile.gettempdir()) < 60 else "/tmp"
        self._dir = Path(tempfile.mkdtemp(prefix="llmflow-ssh-", dir=base))
        self._control = self._dir / "control"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0
        try:
            self.local_port = self._start_on_a_free_port()
        except BaseException:
            self._cleanup_dir()
            raise
        self._watch = threading.Thread(target=self._watch_loop, name=f"ssh-forward-{self.local_port}", daemon=True)
        self._watch.start()

    @property
    def bind_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.local_port)

    @property
    def pid(self) -> int | None:
        """The ssh master's pid (tests cut the connection by killing it)."""
        return self._proc.pid if self._proc is not None else None

    # -- the ssh command line ------------------------------------------------------------
    def _base_args(self) -> list[str]:
        login, target = self.login, self._resolved
        config = login.ssh_config.expanduser() if login.ssh_config is not None else None
        args = [self._ssh, "-F", str(config) if config is not None and config.exists() else "/dev/null"]
        args += ["-p", str(target.port), "-l", target.user, "-S", str(self._control)]
        for key in target.key_files:
            args += ["-i", key, "-o", "IdentitiesOnly=yes"]
        if target.proxy_jump:
            args += ["-J", target.proxy_jump]
        args += [
            "-o", f"UserKnownHostsFile={login.known_hosts.expanduser()}",
            "-o", f"StrictHostKeyChecking={'accept-new' if login.accept_unknown_host_key else 'yes'}",
            "-o", f"ConnectTimeout={max(1, int(login.connect_timeout_s))}",
            "-o", f"BatchMode={'no' if login.key_passphrase else 'yes'}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",  # a dead network ends the master
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlPersist=no",
        ]  # fmt: skip
        return args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.login.key_passphrase is not None:
            askpass = self._dir / "askpass"
            if not askpass.exists():
                askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$LLMFLOW_SSH_KEY_PASSPHRASE"\n')
                askpass.chmod(0o700)
            env.update(
                SSH_ASKPASS=str(askpass),
                SSH_ASKPASS_REQUIRE="force",
                LLMFLOW_SSH_KEY_PASSPHRASE=self.login.key_passphrase.get_secret_value(),
            )
        return env

    def _spec(self, node: str, port: int, local_port: int | None = None) -> str:
        return f"127.0.0.1:{local_port or self.local_port}:{node}:{port}"

    def _all_specs(self) -> list[str]:
        specs = [self._spec(*self.target)] if self._primary else []
        return specs + [self._spec(node, port, lp) for lp, (node, port) in self._extra.items()]

    # -- starting and watching -------------------------------------------------------------
    def _start_on_a_free_port(self) -> int:
        for attempt in range(3):
            self.local_port = _free_port()
            try:
                self._start()
                return self.local_port
            except _PortTaken:
                if attempt == 2:
                    raise CommandFailed(
                        f"ssh could not listen on 127.0.0.1 (tried 3 free ports): {self._log_tail()}"
                    ) from None
        raise AssertionError("unreachable")

    def _start(self, timeout_s: float | None = None) -> None:
        """Start the master with the forward; return once its control socket answers."""
        self._control.unlink(missing_ok=True)
        # A terminal and a command that only waits, not -N: sshd (and ssh) set TCP_NODELAY on an
        # interactive connection only, and without it each response waits ~40 ms on Nagle's
        # algorithm and the peer's delayed ACK (measured: a 50 ms request took 95 ms with -N).
        cmd = self._base_args() + ["-M", "-tt"]
        for spec in self._all_specs():
            cmd += ["-L", spec]
        cmd.append(self._resolved.hostname)
        cmd.append(f"sleep {2**31 - 1}")
        if self._proc is not None:
            orphans.forget(self._proc.pid)  # ended: its pid may be someone else's soon
        with (self._dir / "ssh.log").open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self._env(), start_new_session=True
            )
        # its own session keeps a terminal's Ctrl-C off it until teardown; the guard ends it if we are killed
        orphans.stop_with_this_process(self._proc.pid)
        deadline = time.monotonic() + (timeout_s or self.login.connect_timeout_s + 10)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._start_error()
            if self._control.exists() and self._ctl("check").returncode == 0:
                return
            time.sleep(0.02)
        self._stop_proc()
        raise CommandFailed(f"ssh forward to {self._resolved.hostname} not up in time: {self._log_tail()}")

    def _start_error(self) -> Exception:
        tail = self._log_tail()
        if "Host key verification failed" in tail or "REMOTE HOST IDENTIFICATION HAS CHANGED" in tail:
            return HostKeyRejected(
                f"ssh refused the host key of {self._resolved.hostname} (known hosts: {self.login.known_hosts}): {tail}"
            )
        if "Address already in use" in tail or "cannot listen to port" in tail:
            return _PortTaken(tail)
        return CommandFailed(f"ssh exited {self._proc.returncode if self._proc else '?'}: {tail}")

    def _watch_loop(self) -> None:
        """Start the master again (same local port, current target) whenever it ends."""
        while not self._closed.is_set():
            proc = self._proc
            if proc is None or proc.poll() is None:
                self._closed.wait(0.2)
                continue
            with self._lock:
                if self._closed.is_set():
                    return
                log.warning("ssh forward to %s:%s dropped (exit %s); reconnecting", *self.target, proc.returncode)
                self.restarts += 1  # started again (counted first: traffic may flow before _start returns)
                try:
                    self._start()
                except Exception as exc:  # noqa: BLE001 - keep trying while the session lives
                    log.warning("ssh forward reconnect failed: %s", exc)
                    self._closed.wait(2.0)

    def _ctl(self, *op: str) -> subprocess.CompletedProcess:
        """A control command to the running master (check, forward, cancel, exit)."""
        cmd = self._base_args() + ["-O", *op, self._resolved.hostname]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15, env=self._env())

    def retarget(self, node: str, port: int) -> None:
        """Point the forward at a new node:port (a requeued job); the local port stays."""
        with self._lock:
            old, self.target = self.target, (node, port)
            if old == self.target or self._proc is None or self._proc.poll() is not None:
                return  # a restarting master picks up the new target
            self._ctl("cancel", "-L", self._spec(*old))
            res = self._ctl("forward", "-L", self._spec(node, port))
            if res.returncode != 0:
                raise CommandFailed(f"ssh could not move the forward to {node}:{port}: {res.stderr.strip()}")

    # -- more forwards on the same connection (the replicas of one session) ---------------------
    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def add(self, node: str, port: int) -> int:
        """One more forward, 127.0.0.1:<free port> -> node:port, on this connection; its local port."""
        with self._lock:
            for _ in range(3):
                local_port = _free_port()
                if local_port == self.local_port or local_port in self._extra:
                    continue  # the first forward's port, free again after it was removed
                if not self._running():  # restarting: the new master opens it with the others
                    self._extra[local_port] = (node, port)
                    return local_port
                res = self._ctl("forward", "-L", self._spec(node, port, local_port))
                if res.returncode == 0:
                    self._extra[local_port] = (node, port)
                    return local_port
            raise CommandFailed(f"ssh could not add a forward to {node}:{port} (tried 3 local ports)")

    def move(self, local_port: int, node: str, port: int) -> None:
        """Point the forward on ``local_port`` at a new node:port; the local port stays."""
        if local_port == self.local_port:
            self.retarget(node, port)
            return
        with self._lock:
            old = self._extra[local_port]
            self._extra[local_port] = (node, port)
            if old == (node, port) or not self._running():
                return
            self._ctl("cancel", "-L", self._spec(*old, local_port))
            res = self._ctl("forward", "-L", self._spec(node, port, local_port))
            if res.returncode != 0:
                raise CommandFailed(f"ssh could not move the forward to {node}:{port}: {res.stderr.strip()}")

    def remove(self, local_port: int) -> None:
        """Stop forwarding ``local_port``; the connection and its other forwards stay."""
        with self._lock:
            if local_port == self.local_port:
                target, self._primary = (self.target if self._primary else None), False
            else:
                target = self._extra.pop(local_port, None)
            if target is not None and self._running():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._ctl("cancel", "-L", self._spec(*target, local_port))

    # -- closing ------------------------------------------------------------------------------
    def _stop_proc(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def _log_tail(self) -> str:
        try:
            return " | ".join((self._dir / "ssh.log").read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no ssh output)"

    def _cleanup_dir(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._control.exists():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._ctl("exit")
            self._stop_proc()
            if self._proc is not None:
                orphans.forget(self._proc.pid)
        self._cleanup_dir()


class ForwardPort:
    """One forward on a connection that other forwards share (``OpenSSHForward.add``).

    The replicas of one session each get one, so a single SSH connection to the login node
    carries all of their traffic; ``close`` drops this forward only, the connection stays.
    """

    def __init__(self, master: OpenSSHForward, node: str, port: int, local_port: int | None = None) -> None:
        self.master = master
        self.target = (node, port)
        self.local_port = local_port if local_port is not None else master.add(node, port)

    @property
    def bind_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.local_port)

    @property
    def pid(self) -> int | None:
        return self.master.pid

    @property
    def restarts(self) -> int:
        return self.master.restarts

    def retarget(self, node: str, port: int) -> None:
        self.master.move(self.local_port, node, port)
        self.target = (node, port)

    def close(self) -> None:
        self.master.remove(self.local_port)


class _PortTaken(Exception):
    """ssh could not bind the local port chosen a moment before (someone took it)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""The port forwards against the test cluster's real sshd: OpenSSH (the default) and paramiko.

What a session relies on: 127.0.0.1 only, host keys checked, a key with a passphrase usable
without it ever reaching a command line or a file, ``retarget`` keeping the local URL, a cut
connection coming back by itself, and nothing left after ``close``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmflow.errors import HostKeyRejected
from llmflow.remote.connections import close_run, forward_for
from llmflow.remote.shell import SSHShell
from llmflow.remote.tunnel import LocalForward, OpenSSHForward
from tests.integration.test_slurm import _login

pytestmark = pytest.mark.integration


@pytest.fixture
def web(tmp_path: Path) -> Iterator[list[int]]:
    """Two small real HTTP servers on loopback, each serving /who with its own name."""
    procs, ports = [], []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        (root / "who").write_text(name)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        ports.append(port)
    for port in ports:
        _get_eventually(f"http://127.0.0.1:{port}/who")
    yield ports
    for proc in procs:
        proc.kill()
        proc.wait()


def _get_eventually(url: str, timeout_s: float = 15.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=5).text
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _listening_addresses(port: int) -> list[str]:
    """The addresses on which something listens on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                packed = bytes.fromhex(address)
                if len(packed) == 4:
                    found.append(socket.inet_ntop(socket.AF_INET, packed[::-1]))
                else:
                    words = b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _ssh_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_openssh_forward_retargets_reconnects_and_leaves_nothing(test_cluster, web):
    a, b = web
    forward = OpenSSHForward(_login(test_cluster), "127.0.0.1", a)
    url = f"http://127.0.0.1:{forward.local_port}/who"
    try:
        assert forward.bind_address == ("127.0.0.1", forward.local_port)
        assert _listening_addresses(forward.local_port) == ["127.0.0.1"]  # loopback only, as the kernel sees it
        assert httpx.get(url).text == "a"
        forward.retarget("127.0.0.1", b)
        assert httpx.get(url).text == "b"  # same local URL, new target
        first = forward.pid
        os.kill(first, signal.SIGKILL)  # the SSH connection is cut under it
        assert _get_eventually(url) == "b" and forward.pid != first and forward.restarts == 1
        control_dir = forward._dir
    finally:
        forward.close()
    assert not control_dir.exists()
    assert _ssh_processes(f"127.0.0.1:{forward.local_port}:") == []


def test_openssh_forward_checks_host_keys(test_cluster, web, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    with pytest.raises(HostKeyRejected, match="Host key verification failed"):
        OpenSSHForward(_login(test_cluster, known_hosts=empty), "127.0.0.1", web[0])
    OpenSSHForward(_login(test_cluster, known_hosts=empty, accept_unknown_host_key=True), "127.0.0.1", web[0]).close()
    assert "ssh-ed25519" in empty.read_text()  # remembered: trusted from now on without opting in
    OpenSSHForward(_login(test_cluster, known_hosts=empty), "127.0.0.1", web[0]).close()


def test_a_key_with_a_passphrase_works_and_the_passphrase_stays_in_memory(test_cluster, web):
    login = _login(
        test_cluster,
        key_file=Path(test_cluster["LLMFLOW_TEST_SSH_KEY_WITH_PASSPHRASE"]),
        key_passphrase=test_cluster["LLMFLOW_TEST_SSH_PASSPHRASE"],
    )
    secret = test_cluster["LLMFLOW_TEST_SSH_PASSPHRASE"]
    forward = OpenSSHForward(login, "127.0.0.1", web[0])
    try:
        assert httpx.get(f"http://127.0.0.1:{forward.local_port}/who").text == "a"
        cmdline = Path(f"/proc/{forward.pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline
        assert all(secret not in p.read_text(errors="replace") for p in forward._dir.iterdir() if p.is_file())
    finally:
        forward.close()
    shell = SSHShell(login)  # paramiko takes the passphrase too (commands, SFTP)
    assert shell.run("echo ok").stdout.strip() == "ok"
    shell.close()


@pytest.mark.parametrize(("choice", "kind"), [("openssh", OpenSSHForward), ("paramiko", LocalForward)])
def test_the_login_chooses_the_forward(test_cluster, web, choice, kind):
    forward = forward_for("tunnel-test-run", _login(test_cluster, forward=choice), "127.0.0.1", web[0])
    try:
        assert isinstance(forward, kind)
        assert httpx.get(f"http://127.0.0.1:{forward.local_port}/who").text == "a"
    finally:
        close_run("tunnel-test-run")

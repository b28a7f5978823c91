"""Local port forward through the login node (``ssh -L``, in-process, with paramiko).

Listens on 127.0.0.1 only, on a free port. Each accepted connection gets its own
``direct-tcpip`` channel to node:port through the SSH transport; if the connection to the
login node dropped, the next connection reconnects it. ``retarget`` points new connections
at a new node:port (a requeued job), without changing the local URL the client uses.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable

import paramiko

log = logging.getLogger(__name__)


class LocalForward:
    """127.0.0.1:<free port> -> (via SSH) -> node:port."""

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
        except (paramiko.SSHException, EOFError, OSError):
            # one retry: ``transport()`` reconnects a dropped SSH connection
            return self._transport().open_channel("direct-tcpip", self.target, peer, timeout=20)

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            channel = self._open_channel(peer)
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

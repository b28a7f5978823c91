"""One stable URL in front of a session's replicas: nginx on 127.0.0.1, started and stopped by the session.

nginx runs on the machine that runs the flow (a laptop, the login node), in the foreground
as a child of the flow in its own process group, with a lease like any server's so a killed
flow's nginx is released by the next session or ``llmflow cleanup``. Its upstreams are the
replicas' local URLs (the SSH forwards, or the local servers); when replicas come and go the
configuration is rewritten and nginx reloaded (``nginx -s reload``), so the URL never changes.
Requests go to the replica with the fewest connections (``least_conn``); a request that could
not reach one is passed to the next (``proxy_next_upstream``, POSTs included: a completion
is safe to compute twice); streams pass through unbuffered. The API key is checked by the
replicas, which share one key for this reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from llmflow.errors import CommandFailed, ConfigError
from llmflow.remote.leases import remove_lease, write_lease

EMPTY_UPSTREAM = "127.0.0.1:9"  # no replica ready yet: nginx needs a server; this one refuses (502)


def render_nginx_conf(prefix: Path, listen_port: int, upstreams: list[str], run_as_root: bool = False) -> str:
    """nginx.conf for the gateway: listen on 127.0.0.1 only, ``upstreams`` as host:port."""
    servers = [f"        server {u} max_fails=1 fail_timeout=5s;" for u in sorted(upstreams)] or [
        f"        server {EMPTY_UPSTREAM} down;"
    ]
    return "\n".join(
        [
            *(["user root;"] if run_as_root else []),  # workers must reach the 0700 prefix folder
            "worker_processes 1;",
            "daemon off;",
            f"pid {prefix}/nginx.pid;",
            f"error_log {prefix}/error.log warn;",
            "events { worker_connections 4096; }",
            "http {",
            f"    access_log {prefix}/access.log;",
            f"    client_body_temp_path {prefix}/tmp/body;",
            f"    proxy_temp_path {prefix}/tmp/proxy;",
            f"    fastcgi_temp_path {prefix}/tmp/fastcgi;",
            f"    uwsgi_temp_path {prefix}/tmp/uwsgi;",
            f"    scgi_temp_path {prefix}/tmp/scgi;",
            "    client_max_body_size 64m;",
            "    upstream replicas {",
            "        least_conn;",
            *servers,
            "        keepalive 64;",
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{listen_port};",
            "        location / {",
            "            proxy_pass http://replicas;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_buffering off;",  # streams pass through as they come
            # request bodies stay buffered (they are small): nginx passes a request to the next
            # upstream only if it can send the body again
            "            proxy_read_timeout 3600s;",
            "            proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
            "            proxy_next_upstream_tries 3;",
            "        }",
            "    }",
            "}",
            "",
        ]
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx(name: str = "nginx") -> str:
    """The nginx binary (PATH, then /usr/sbin, where Debian puts it); a clear error when missing."""
    binary = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if binary is None:
        raise ConfigError("a stable URL for replicas needs nginx (Debian: apt-get install nginx-light)")
    return binary


class Gateway:
    """nginx in front of the replicas; ``update`` with the ready replicas' URLs, ``close`` at the end."""

    def __init__(self, run_dir: Path, run_id: str, flow_run_id: str | None = None, nginx: str = "nginx") -> None:
        self.nginx = find_nginx(nginx)
        self.dir = run_dir
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.conf = self.dir / "nginx.conf"
        self.run_id, self.flow_run_id = run_id, flow_run_id
        self.upstreams: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.port = 0
        self.reloads = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self) -> None:
        self.conf.write_text(render_nginx_conf(self.dir, self.port, self.upstreams, run_as_root=os.geteuid() == 0))

    def _nginx(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.nginx, "-p", str(self.dir), "-c", str(self.conf), *args], capture_output=True, text=True, timeout=30
        )

    def start(self, upstreams: list[str] | None = None) -> Gateway:
        """Start nginx on a free 127.0.0.1 port; return once it accepts connections."""
        self.upstreams = list(upstreams or [])
        for _ in range(3):
            self.port = _free_port()
            self._write()
            if (check := self._nginx("-t")).returncode != 0:
                raise CommandFailed(f"nginx refused its configuration {self.conf}: {check.stderr.strip()}")
            log = (self.dir / "nginx.out").open("ab")
            self._proc = subprocess.Popen(
                [self.nginx, "-p", str(self.dir), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            write_lease(self.dir, self.run_id, "local", pgid=self._proc.pid, flow_run_id=self.flow_run_id)
            if self._wait_listening():
                return self
            self._stop_proc()  # the port was taken in between: try another
        remove_lease(self.dir)
        raise CommandFailed(f"nginx did not start; see {self.dir / 'error.log'}")

    def _wait_listening(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def update(self, upstreams: list[str]) -> None:
        """Point nginx at these replicas (host:port each) and reload; nothing to do if unchanged."""
        with self._lock:
            if sorted(upstreams) == sorted(self.upstreams) or self._proc is None:
                return
            before, self.upstreams = self.upstreams, list(upstreams)
            self._write()
            old_workers = self._workers()
            res = self._nginx("-s", "reload")
            if res.returncode != 0:
                self.upstreams = before  # so the same update is tried again, not skipped as unchanged
                raise CommandFailed(f"nginx -s reload failed: {res.stderr.strip()}")
            self.reloads += 1
            # the reload is done when the old workers are gone (they finish what they serve and
            # close their kept-alive connections); a long stream may keep one, so wait a while only
            deadline = time.monotonic() + 5.0
            while old_workers & self._workers() and time.monotonic() < deadline:
                time.sleep(0.05)

    def _workers(self) -> set[str]:
        if self._proc is None:
            return set()
        out = subprocess.run(["pgrep", "-P", str(self._proc.pid)], capture_output=True, text=True).stdout
        return set(out.split())

    def _stop_proc(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop_proc()
            remove_lease(self.dir)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

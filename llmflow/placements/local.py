"""Local placement: the server is a child process group of the flow, on this machine."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from llmflow import engines
from llmflow.config import LocalPlacement, SessionConfig
from llmflow.remote.leases import read_lease, remove_lease, write_lease
from llmflow.placements.base import LAUNCHER, ServerDied, make_run_dir, write_secret
from llmflow.remote.procs import group_alive, stop_group, tail
from llmflow.results import Allocation, ServerHandle, Teardown, Tunnel


def launch_script(spec: engines.LaunchSpec, python: Path, endpoint_file: Path, host: str) -> str:
    """The bash script that runs the setup lines, then execs the supervisor under the server's Python.

    Setup lines are the user's own shell (module load, source, export) and run as written;
    everything this project adds is quoted.
    """
    launcher = [str(python), str(LAUNCHER), "--endpoint-file", str(endpoint_file), "--host", host, "--watch-parent", "--"]
    return "\n".join(["set -e", *spec.setup, "exec " + shlex.join(launcher + spec.argv)]) + "\n"


class LocalDriver:
    """The server is a child process group of the flow process on this machine."""

    kind = "local"

    def __init__(self, config: SessionConfig) -> None:
        assert isinstance(config.placement, LocalPlacement)
        self.config = config
        self.placement = config.placement

    def preflight(self) -> None:
        """Checks that need the machine (not just the config): fail before starting anything."""
        engines.spec_for(self.config.engine).check_installed()
        if not self.config.model.path.exists():
            raise ValueError(f"model.path: {self.config.model.path} does not exist (`make model` writes the tiny one)")

    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        run_dir = make_run_dir(self.config.runs_dir, run_id)
        return Allocation(
            placement=self.kind,
            run_id=run_id,
            node=socket.gethostname(),
            run_dir=run_dir,
            started_at=datetime.now(timezone.utc),
        )

    def warm(self, alloc: Allocation, flow_run_id: str | None, wait_s: float = 60.0) -> ServerHandle:
        """Start supervisor + server; return once the endpoint record (port, pids) is written."""
        cfg = self.config
        run_dir = alloc.run_dir
        self._stop(alloc)  # a retried warm-up must not leave the first attempt's server behind
        endpoint_file = run_dir / "endpoint.json"
        endpoint_file.unlink(missing_ok=True)
        api_key = secrets.token_urlsafe(32) if (engines.spec_for(cfg.engine).api_key_env is not None) else None
        key_file = None
        if api_key:
            key_file = run_dir / "api_key"
            write_secret(key_file, api_key)
        spec = engines.spec_for(cfg.engine).launch(cfg.model, self.placement.bind_host, api_key)
        log_path = run_dir / "server.log"
        script = launch_script(spec, engines.spec_for(cfg.engine).server_python(), endpoint_file, self.placement.bind_host)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                ["bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **spec.env},
                cwd=run_dir,
            )
        write_lease(run_dir, alloc.run_id, self.kind, pgid=proc.pid, flow_run_id=flow_run_id)
        deadline = time.monotonic() + wait_s
        while not endpoint_file.exists():
            if proc.poll() is not None:
                remove_lease(run_dir)
                raise ServerDied(f"server exited with code {proc.returncode} before it chose a port; log tail:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                self._stop(alloc)
                raise TimeoutError(f"no endpoint record after {wait_s:.0f}s; log tail:\n{tail(log_path)}")
            time.sleep(0.05)
        ep = json.loads(endpoint_file.read_text())
        return ServerHandle(
            engine=cfg.engine.kind,
            run_id=alloc.run_id,
            node=alloc.node,
            host=ep["host"],
            port=int(ep["port"]),
            pid=int(ep["pid"]),
            server_pid=int(ep["server_pid"]),
            api_key_file=key_file,
            log_path=log_path,
            served_name=cfg.model.served_name,
        )

    def tunnel(self, handle: ServerHandle) -> Tunnel:
        """Local: the endpoint is reached directly, no forward needed."""
        return Tunnel(base_url=f"http://{handle.host}:{handle.port}", local_port=handle.port, forwarded=False)

    def check_alive(self, handle: ServerHandle) -> None:
        """Raise ServerDied with the log's tail if the server is gone."""
        if not group_alive(handle.pid):
            raise ServerDied(f"{handle.engine} server (pid {handle.server_pid}) is gone; log tail:\n{tail(handle.log_path)}")

    def recover(self, alloc: Allocation, handle: ServerHandle) -> tuple[ServerHandle, Tunnel] | None:
        """A local server is either alive (nothing to recover) or dead (fail with its log)."""
        self.check_alive(handle)
        return None

    def _stop(self, alloc: Allocation) -> list[int]:
        lease = read_lease(alloc.run_dir)
        stopped = []
        if lease is not None:
            if lease.pgid is not None and stop_group(lease.pgid):
                stopped.append(lease.pgid)
            remove_lease(alloc.run_dir)
        return stopped

    def teardown(self, alloc: Allocation) -> Teardown:
        """Stop the server's whole process group; a second call finds nothing and says so."""
        stopped = self._stop(alloc)
        return Teardown(
            run_id=alloc.run_id,
            stopped_pids=stopped,
            already_gone=not stopped,
            released_at=datetime.now(timezone.utc),
        )


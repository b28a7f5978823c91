"""Local placement: the server is a child process group of the flow, on this machine."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from llmflow import engines, secret_env
from llmflow.config import SessionConfig
from llmflow.errors import ServerDied
from llmflow.paths import local_server_paths
from llmflow.placements import cpus
from llmflow.placements.base import PLACEMENTS, Driver, make_run_dir, mint_api_key, tail_note, wait_for_endpoint
from llmflow.remote.leases import Lease, read_lease, remove_lease, write_lease
from llmflow.remote.procs import group_alive, stop_group, tail
from llmflow.remote.start_script import SUPERVISOR
from llmflow.results import Allocation, ServerHandle, Teardown


def launch_script(spec: engines.LaunchSpec, python: Path, endpoint_file: Path, host: str) -> str:
    """The bash script that runs the setup lines, then execs the supervisor under the server's Python.

    Setup lines are the user's own shell (module load, source, export) and run as written;
    everything this project adds is quoted.
    """
    launcher = [
        str(python),
        str(SUPERVISOR),
        "--endpoint-file",
        str(endpoint_file),
        "--host",
        host,
        "--watch-parent",
        "--",
    ]
    return "\n".join(["set -e", *spec.setup, "exec " + shlex.join(launcher + spec.argv)]) + "\n"


@PLACEMENTS.register("local")
class LocalDriver(Driver):
    """The server is a child process group of the flow process on this machine."""

    kind = "local"

    def __init__(self, config: SessionConfig) -> None:
        super().__init__(local_server_paths(config))

    def preflight(self, blocks: bool = True) -> None:
        super().preflight(blocks)
        spec = engines.spec_for(self.config.engine)
        spec.check_installed()
        spec.check_model(self.config.model.path)
        self._server_cpus()

    def _server_cpus(self) -> set[int] | None:
        """``placement.server_cpus`` checked against the CPUs this process may use; None if unset."""
        wanted = self.placement.server_cpus
        return None if wanted is None else cpus.check_server_cpus(wanted, cpus.available_cpus())

    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        run_dir = make_run_dir(self.config.runs_dir, run_id)
        return Allocation(
            placement=self.kind,
            run_id=run_id,
            node=socket.gethostname(),
            run_dir=run_dir,
            started_at=datetime.now(UTC),
        )

    def warm(self, alloc: Allocation, flow_run_id: str | None = None, wait_s: float = 60.0) -> ServerHandle:
        """Start supervisor + server; return once the endpoint record (port, pids) is written."""
        cfg, run_dir = self.config, alloc.run_dir
        self._stop(alloc)  # a retried warm-up must not leave the first attempt's server behind
        endpoint_file = run_dir / "endpoint.json"
        endpoint_file.unlink(missing_ok=True)
        api_key, key_file = mint_api_key(cfg, run_dir)
        spec = engines.spec_for(cfg.engine)
        launch = spec.launch(cfg.model, self.placement.bind_host, api_key)
        log_path = run_dir / "server.log"
        script = launch_script(launch, spec.server_python(), endpoint_file, self.placement.bind_host)
        server_cpus = self._server_cpus()
        # taskset, not a preexec_fn: that is unsafe in a process with threads (the flow's)
        pin = [] if server_cpus is None else ["taskset", "--cpu-list", cpus.cpu_list(server_cpus)]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*pin, "bash", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **launch.env, **secret_env.resolve(cfg.engine.secret_env)},  # never on disk
                cwd=run_dir,
            )
        write_lease(run_dir, alloc.run_id, self.kind, pgid=proc.pid, flow_run_id=flow_run_id)
        self.log.info("started the server (process group %d); run folder %s; its log: %s", proc.pid, run_dir, log_path)

        def started() -> None:
            if proc.poll() is not None:
                remove_lease(run_dir)
                raise ServerDied(
                    f"server exited with code {proc.returncode} before it chose a port; {tail_note(str(log_path), tail(log_path))}"
                )

        try:
            ep = wait_for_endpoint(
                lambda: json.loads(endpoint_file.read_text()) if endpoint_file.exists() else None,
                started,
                timeout_s=wait_s,
                interval_s=0.05,
            )
        except TimeoutError as exc:
            self._stop(alloc)
            raise TimeoutError(f"{exc}; {tail_note(str(log_path), tail(log_path))}") from None
        if server_cpus is not None:
            self.log.info("server on CPUs %s", cpus.cpu_list(server_cpus))
            cpus.keep_off(alloc.run_id, server_cpus, self.log)
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

    def check_alive(self, handle: ServerHandle) -> None:
        if not group_alive(handle.pid):
            raise ServerDied(f"{handle.engine} server (pid {handle.server_pid}) is gone; {self._log_note(handle)}")

    def log_tail(self, handle: ServerHandle, lines: int = 30) -> str | None:
        return tail(handle.log_path, lines) if handle.log_path is not None else None

    def _log_note(self, handle: ServerHandle) -> str:
        return tail_note(str(handle.log_path), self.log_tail(handle) or "(no log)")

    def memory_group(self, handle: ServerHandle) -> int | None:
        return handle.pid  # the supervisor leads the server's process group, here

    def _stop(self, alloc: Allocation) -> list[int]:
        lease = read_lease(alloc.run_dir)
        stopped = []
        if lease is not None:
            if self.release_lease(lease):
                stopped.append(lease.pgid)
            remove_lease(alloc.run_dir)
        return stopped

    def teardown(self, alloc: Allocation) -> Teardown:
        """Stop the server's whole process group; a second call finds nothing and says so."""
        stopped = self._stop(alloc)
        cpus.release(alloc.run_id, self.log)
        return Teardown(
            run_id=alloc.run_id,
            stopped_pids=stopped,
            already_gone=not stopped,
            released_at=datetime.now(UTC),
        )

    @classmethod
    def release_lease(cls, lease: Lease) -> bool:
        return lease.pgid is not None and stop_group(lease.pgid)

    @classmethod
    def lease_server_alive(cls, lease: Lease) -> bool | None:
        return group_alive(lease.pgid) if lease.pgid is not None else None

"""SSH placement: the server runs on a host that is already up, started over SSH.

allocate: a private run folder on the host (mode 0700) and a lease. warm: write the API key
(0600) and the start script, start it under ``setsid nohup`` (its own session and process
group, so it outlives the SSH connection and can be stopped as a group), wait for the
supervisor's endpoint record. tunnel: a paramiko forward from 127.0.0.1 here to the server's
loopback port there. teardown: SIGTERM the group, SIGKILL after a grace, confirm it is gone.

Everything a later process needs to stop the server (host, process group) is in the lease,
so ``llmflow cleanup`` and the crash hooks can release what a dead run left.
"""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from pathlib import Path

from llmflow.config import SSHPlacement
from llmflow.errors import CommandFailed, ServerDied
from llmflow.placements.base import PLACEMENTS, RemoteDriver, make_run_dir, mint_api_key, wait_for_endpoint
from llmflow.remote import heartbeat
from llmflow.remote.connections import close_run, forward_for
from llmflow.remote.leases import Lease, read_lease, remove_lease, write_lease
from llmflow.remote.shell import Shell, make_remote_run_dir
from llmflow.remote.start_script import server_start_lines
from llmflow.results import Allocation, ServerHandle, Teardown, Tunnel

GRACE_S = 10


def start_command(remote_dir: str) -> str:
    """Start the script in a new session; print its pid (= its process group id).

    In a non-interactive shell a background job is not a group leader, so ``setsid`` makes
    the new session without forking: ``$!`` is the pid, the session id and the group id.
    """
    d = shlex.quote(remote_dir)
    # `&` must apply to setsid alone: a backgrounded `cd && setsid ...` list would be a subshell
    # holding the SSH channel's stdout open, and the command would never return. The group
    # exists only once the child has called setsid(): wait for it (up to 1 s) before printing,
    # or a liveness check right after start can find no group and call the server dead.
    return (
        f"cd {d} || exit 1; setsid nohup bash start.sh >> server.log 2>&1 < /dev/null & pid=$!; "
        "for _ in $(seq 1 50); do kill -0 -- -$pid 2>/dev/null && break; sleep 0.02; done; echo $pid"
    )


def alive_command(pgid: int) -> str:
    """Exit status 0 while any process of the group lives."""
    return f"kill -0 -- -{int(pgid)} 2>/dev/null"


def stop_command(pgid: int, grace_s: int = GRACE_S) -> str:
    """SIGTERM the group, SIGKILL after ``grace_s``. Exit 0: stopped; 3: was already gone; 4: survived."""
    g = int(pgid)
    return (
        f"kill -TERM -- -{g} 2>/dev/null || exit 3; "
        f"for _ in $(seq 1 {int(grace_s) * 10}); do kill -0 -- -{g} 2>/dev/null || exit 0; sleep 0.1; done; "
        f"kill -KILL -- -{g} 2>/dev/null; "
        f"for _ in $(seq 1 50); do kill -0 -- -{g} 2>/dev/null || exit 0; sleep 0.1; done; exit 4"
    )


def stop_remote_group(shell: Shell, pgid: int) -> bool:
    """Stop the server's process group on the host; True if it was running."""
    res = shell.run(stop_command(pgid), timeout=GRACE_S + 30)
    if res.rc == 4:
        raise CommandFailed(f"process group {pgid} on the host survived SIGKILL")
    return res.rc == 0


def remote_pgid(shell: Shell, lease: Lease) -> int | None:
    """The server's group: from the lease, or from the pid file the start script wrote first
    (a run killed between starting the server and recording its pid still leaves this)."""
    if lease.pgid is not None:
        return lease.pgid
    if not lease.remote_dir:
        return None
    text = (shell.read_file(f"{lease.remote_dir}/server.pgid") or "").strip()
    return int(text) if text.isdigit() else None


@PLACEMENTS.register("ssh")
class SSHDriver(RemoteDriver):
    kind = "ssh"
    config_model = SSHPlacement
    placement: SSHPlacement

    # -- allocate ----------------------------------------------------------------------
    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        """The host is already up: allocating is making the run folder there and a lease here."""
        local_dir = make_run_dir(self.config.runs_dir, run_id)
        shell = self.shell(run_id)
        remote_dir = make_remote_run_dir(shell, self.placement.remote_runs_dir, run_id, "host")
        node = shell.run("hostname").stdout.strip() or self.placement.login.host
        self._lease(local_dir, run_id, flow_run_id, remote_dir)
        self.keep_alive(run_id, remote_dir)
        return Allocation(
            placement=self.kind,
            run_id=run_id,
            node=node,
            run_dir=local_dir,
            remote_dir=remote_dir,
            started_at=datetime.now(UTC),
        )

    def _lease(
        self, run_dir: Path, run_id: str, flow_run_id: str | None, remote_dir: str, pgid: int | None = None
    ) -> None:
        write_lease(
            run_dir,
            run_id,
            self.kind,
            pgid=pgid,
            flow_run_id=flow_run_id,
            remote_dir=remote_dir,
            placement_config=self.placement.model_dump(mode="json"),
        )

    # -- warm --------------------------------------------------------------------------
    def warm(self, alloc: Allocation, flow_run_id: str | None = None) -> ServerHandle:
        """Start supervisor + server on the host; return once its endpoint record is written."""
        assert alloc.remote_dir
        cfg, remote_dir = self.config, alloc.remote_dir
        shell = self.shell(alloc.run_id)
        self._stop(alloc)  # a retried warm-up must not leave the first attempt's server behind
        shell.run(f"rm -f {shlex.quote(remote_dir)}/endpoint.json {shlex.quote(remote_dir)}/server.pgid")
        api_key, key_file = mint_api_key(cfg, alloc.run_dir)
        if api_key:
            shell.write_file(f"{remote_dir}/api_key", api_key, 0o600)
        self.write_secrets(shell, remote_dir)
        shell.write_file(f"{remote_dir}/start.sh", self._start_script(remote_dir), 0o700)
        res = shell.run(start_command(remote_dir)).check("starting the server on the host")
        pgid = int(res.stdout.strip().splitlines()[-1])
        lease = read_lease(alloc.run_dir)
        self._lease(
            alloc.run_dir, alloc.run_id, flow_run_id or (lease.flow_run_id if lease else None), remote_dir, pgid
        )
        log_path = f"{remote_dir}/server.log"
        self.log.info(
            "started the server on %s (process group %d); run folder %s; its log: %s",
            alloc.node,
            pgid,
            self.located(remote_dir),
            self.located(log_path),
        )

        def started() -> None:
            if shell.run(alive_command(pgid)).rc != 0:
                raise ServerDied(
                    f"server on {alloc.node} exited before it chose a port; {self.log_note(shell, log_path)}"
                )

        try:
            ep = wait_for_endpoint(
                lambda: json.loads(text) if (text := shell.read_file(f"{remote_dir}/endpoint.json")) else None,
                started,
                timeout_s=self.placement.start_timeout_s,
                interval_s=self.placement.poll_interval_s / 4,
            )
        except TimeoutError as exc:
            self._stop(alloc)
            raise TimeoutError(f"{exc}; {self.log_note(shell, log_path)}") from None
        return ServerHandle(
            engine=cfg.engine.kind,
            run_id=alloc.run_id,
            node=ep["node"],
            host=ep["host"],
            port=int(ep["port"]),
            pid=pgid,
            server_pid=int(ep["server_pid"]),
            api_key_file=key_file,
            log_path=Path(log_path),
            served_name=cfg.model.served_name,
        )

    def _start_script(self, remote_dir: str) -> str:
        return "\n".join(
            [
                "#!/bin/bash",
                "echo $$ > server.pgid  # setsid made this shell a group leader: teardown can find the group",
                *server_start_lines(**self.start_args(remote_dir)),
                "",
            ]
        )

    # -- tunnel ------------------------------------------------------------------------
    def tunnel(self, handle: ServerHandle) -> Tunnel:
        """A forward from 127.0.0.1 here to the server's address as seen from the host."""
        target = "127.0.0.1" if handle.host in ("0.0.0.0", "") else handle.host
        forward = forward_for(handle.run_id, self.placement.login, target, handle.port)
        return Tunnel(base_url=f"http://127.0.0.1:{forward.local_port}", local_port=forward.local_port, forwarded=True)

    # -- watching ----------------------------------------------------------------------
    def check_alive(self, handle: ServerHandle) -> None:
        assert handle.pid is not None
        shell = self.shell(handle.run_id)
        if shell.run(alive_command(handle.pid)).rc != 0:
            raise ServerDied(
                f"{handle.engine} server on {handle.node} (pid {handle.server_pid}) is gone; "
                f"{self.log_note(shell, str(handle.log_path))}"
            )

    # -- teardown ----------------------------------------------------------------------
    def _stop(self, alloc: Allocation) -> list[int]:
        lease = read_lease(alloc.run_dir)
        if lease is None:
            return []
        shell = self.shell(alloc.run_id)
        pgid = remote_pgid(shell, lease)
        if pgid is None:
            return []
        stopped = [pgid] if stop_remote_group(shell, pgid) else []
        if lease.remote_dir:
            shell.run(f"rm -f {shlex.quote(lease.remote_dir)}/server.pgid")
        # the folder stays leased until teardown; the group is gone
        self._lease(alloc.run_dir, alloc.run_id, lease.flow_run_id, lease.remote_dir or "")
        return stopped

    def teardown(self, alloc: Allocation) -> Teardown:
        """Close the forward, stop the server's group on the host, confirm it is gone."""
        try:
            stopped = self._stop(alloc)
            self.forget_secrets(self.shell(alloc.run_id), alloc.remote_dir)
            remove_lease(alloc.run_dir)
        finally:
            heartbeat.stop(alloc.run_id)
            close_run(alloc.run_id)
        return Teardown(
            run_id=alloc.run_id, stopped_pids=stopped, already_gone=not stopped, released_at=datetime.now(UTC)
        )

    @classmethod
    def release_lease(cls, lease: Lease) -> bool:
        """For ``llmflow cleanup`` and crash hooks: reach the host from the lease and stop the group."""
        with cls.lease_shell(lease) as shell:
            pgid = remote_pgid(shell, lease)
            stopped = pgid is not None and stop_remote_group(shell, pgid)
            cls.forget_secrets(shell, lease.remote_dir)
            return stopped

"""Slurm placement: the server runs in a batch job, reached through the login node.

allocate: write the run folder on the cluster (mode 0700, API key 0600), render and submit
the job with ``sbatch --parsable``, record a lease, wait until RUNNING (a queue deadline; a
job that ends or can never start fails at once with Slurm's reason).
warm: wait for the job's endpoint record (node, port, pid). tunnel: a paramiko forward from
127.0.0.1. recover: after a requeue, wait for the job to run again and follow the new
endpoint. teardown: scancel, confirm the job is gone, close tunnel and SSH, and account
node-hours and GPU-hours.

SSH connections and forwards are process-local objects kept by run id (``remote.connections``);
everything a later process needs to clean up (job id, cluster address) is in the lease file.
"""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path

from llmflow import engines
from llmflow.config import SlurmPlacement
from llmflow.errors import CommandFailed, JobRejected, QueueTimeout, ServerDied, is_permanent
from llmflow.placements import slurm_jobs as slurm
from llmflow.placements.base import (
    PLACEMENTS,
    RemoteDriver,
    make_run_dir,
    mint_api_key,
    registry_file,
    wait_for_endpoint,
)
from llmflow.remote import heartbeat
from llmflow.remote.connections import close_run, forward_for
from llmflow.remote.leases import Lease, read_lease, remove_lease, write_lease
from llmflow.remote.shell import Shell, make_remote_run_dir
from llmflow.results import Allocation, ServerHandle, Teardown, Tunnel

# Pending reasons that mean the job can never start as asked: fail now, don't wait out the deadline.
HOPELESS_REASONS = frozenset(
    {
        "BadConstraints",
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "InvalidAccount",
        "InvalidQOS",
        "AccountNotAllowed",
        "QOSNotAllowed",
        "PartitionDown",
        "PartitionInactive",
    }
)


def job_info(shell: Shell, job_id: str) -> slurm.JobInfo:
    """squeue, then scontrol, then sacct (when accounting exists); GONE when none knows the job."""
    q = shlex.quote(job_id)
    out = shell.run(
        f"squeue -h -j {q} -o {shlex.quote(slurm.SQUEUE_FORMAT)} 2>/dev/null; echo '@@'; "
        f"scontrol show job {q} 2>/dev/null; echo '@@'; "
        f"sacct -n -P -X -j {q} -o JobID,State,Reason,NodeList,ElapsedRaw 2>/dev/null || true"
    ).stdout
    squeue_out, scontrol_out, sacct_out = (out.split("@@\n") + ["", ""])[:3]
    detail = slurm.parse_scontrol(job_id, scontrol_out)
    info = slurm.parse_squeue(job_id, squeue_out)
    if info is not None:
        if detail is not None:
            info = info.model_copy(update={"restarts": detail.restarts, "elapsed_s": detail.elapsed_s})
        return info
    return detail or slurm.parse_sacct(job_id, sacct_out) or slurm.JobInfo(job_id=job_id, state="GONE")


def settled_info(shell: Shell, job_id: str, settle_s: float = 6.0) -> slurm.JobInfo:
    """``job_info``, but a terminal state must hold for ``settle_s``: a job being requeued shows
    FAILED/CANCELLED for a moment (its batch script was killed) before it is PENDING again."""
    info = job_info(shell, job_id)
    deadline = time.monotonic() + settle_s
    while info.terminal and info.state != "GONE" and time.monotonic() < deadline:
        time.sleep(1.0)
        info = job_info(shell, job_id)
    return info


def cancel_and_confirm(shell: Shell, job_id: str, timeout_s: float = 60.0) -> slurm.JobInfo:
    """scancel, then wait until Slurm reports the job finished or forgotten."""
    info = job_info(shell, job_id)
    if not info.terminal:
        shell.run(f"scancel {shlex.quote(job_id)}")
    deadline = time.monotonic() + timeout_s
    while not info.terminal and time.monotonic() < deadline:
        time.sleep(0.5)
        info = job_info(shell, job_id)
    if not info.terminal:
        raise CommandFailed(f"job {job_id} still {info.state} {timeout_s:.0f}s after scancel")
    return info


@PLACEMENTS.register("slurm")
class SlurmDriver(RemoteDriver):
    kind = "slurm"
    config_model = SlurmPlacement
    placement: SlurmPlacement
    queue_reminder_s = 60.0  # a "still PENDING" line this often while the job waits

    # -- allocate ----------------------------------------------------------------------
    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        local_dir = make_run_dir(self.config.runs_dir, run_id)
        shell = self.shell(run_id)
        lease = read_lease(local_dir)
        if lease is not None and lease.job_id:  # a retried task: never submit twice for one run
            job_id, remote_dir = lease.job_id, lease.remote_dir or ""
            self.keep_alive(run_id, remote_dir)
        else:
            job_id, remote_dir = self._submit(shell, run_id, local_dir, flow_run_id)
        try:
            info = self._wait_running(shell, job_id, remote_dir)
        except BaseException as exc:
            heartbeat.stop(run_id)  # a retry of the task starts it again; nothing else will run here
            if is_permanent(exc):  # the job ended or was cancelled: nothing is left to release
                self.forget_secrets(shell, remote_dir)
                remove_lease(local_dir)
            raise
        return Allocation(
            placement=self.kind,
            run_id=run_id,
            node=info.nodes,
            run_dir=local_dir,
            job_id=job_id,
            remote_dir=remote_dir,
            started_at=datetime.now(UTC),
        )

    def _submit(self, shell: Shell, run_id: str, local_dir: Path, flow_run_id: str | None) -> tuple[str, str]:
        remote_dir = make_remote_run_dir(shell, self.placement.remote_runs_dir, run_id, "cluster")
        self.keep_alive(run_id, remote_dir)  # from before the job can start: its server watches the file
        api_key, _ = mint_api_key(self.config, local_dir)
        if api_key:
            shell.write_file(f"{remote_dir}/api_key", api_key, 0o600)
        self.write_secrets(shell, remote_dir)
        script = slurm.render_job_script(
            opts=self.placement.slurm,
            job_name=f"llmflow-{run_id}",
            **self.start_args(remote_dir),
            **self.multinode_args(),
        )
        shell.write_file(f"{remote_dir}/job.sh", script, 0o700)
        (local_dir / "job.sh").write_text(script)
        res = shell.run(f"cd {shlex.quote(remote_dir)} && sbatch --parsable job.sh")
        if res.rc != 0:
            raise JobRejected(f"sbatch refused the job: {(res.stderr or res.stdout).strip()}")
        job_id = slurm.parse_sbatch(res.stdout)
        write_lease(
            local_dir,
            run_id,
            self.kind,
            flow_run_id=flow_run_id,
            job_id=job_id,
            remote_dir=remote_dir,
            placement_config=self.placement.model_dump(mode="json"),
        )
        self.log.info(
            "submitted Slurm job %s; run folder %s; the job's log: %s",
            job_id,
            self.located(remote_dir),
            self.located(self._log_path(remote_dir, job_id)),
        )
        return job_id, remote_dir

    def multinode_args(self) -> dict:
        """For ``placement.nodes`` > 1: the engine's head and workers (``remote.multinode``)."""
        nodes = self.placement.nodes
        if nodes == 1:
            return {}
        launch = engines.spec_for(self.config.engine).launch_multinode(
            self.config.model, self.server_host(), None, nodes
        )
        return {"multinode": launch, "nodes": nodes, "worker_timeout_s": self.placement.worker_start_timeout_s}

    def _log_path(self, remote_dir: str, job_id: str) -> str:
        return f"{remote_dir}/slurm-{job_id}.out"

    def _wait_running(self, shell: Shell, job_id: str, remote_dir: str) -> slurm.JobInfo:
        """Until RUNNING; a job that ended or can never start fails now, with Slurm's reason.

        Each change of state or reason is logged once, with a reminder while nothing changes."""
        deadline = time.monotonic() + self.placement.queue_deadline_s
        watch = slurm.QueueWatch(job_id, self.queue_reminder_s)
        while True:
            info = job_info(shell, job_id)
            if line := watch.note(info, time.monotonic()):
                self.log.info(line)
            if info.running:
                return info
            if info.terminal and (info := settled_info(shell, job_id)).terminal:
                note = self.log_note(shell, self._log_path(remote_dir, job_id))
                raise ServerDied(
                    f"job {job_id} ended {info.state} ({info.reason or 'no reason given'}) before it ran the server; {note}"
                )
            if info.reason in HOPELESS_REASONS:
                cancel_and_confirm(shell, job_id)
                raise JobRejected(f"job {job_id} can never start: {info.state} ({info.reason}); cancelled")
            if time.monotonic() > deadline:
                cancel_and_confirm(shell, job_id)
                raise QueueTimeout(
                    f"job {job_id} still {info.state} ({info.reason or 'no reason given'}) after "
                    f"{self.placement.queue_deadline_s:.0f}s in the queue; cancelled"
                )
            time.sleep(self.placement.poll_interval_s)

    # -- warm --------------------------------------------------------------------------
    def warm(self, alloc: Allocation, flow_run_id: str | None = None, min_restarts: int = 0) -> ServerHandle:
        """Wait for the endpoint record the job's supervisor writes; fail fast if the job ends."""
        shell = self.shell(alloc.run_id)
        assert alloc.job_id and alloc.remote_dir
        job_id, remote_dir = alloc.job_id, alloc.remote_dir
        log_path = self._log_path(remote_dir, job_id)

        def current() -> dict | None:
            """The endpoint record of this run of the job (a requeued job writes a new one)."""
            text = shell.read_file(f"{remote_dir}/endpoint.json")
            ep = json.loads(text) if text else None
            return ep if ep is not None and ep.get("restarts", 0) >= min_restarts else None

        def job_running() -> None:
            info = job_info(shell, job_id)
            if info.terminal and (info := settled_info(shell, job_id)).terminal:
                raise self._ended(shell, info, log_path)

        try:
            ep = wait_for_endpoint(
                current,
                job_running,
                timeout_s=self.config.gate.deadline_s,
                interval_s=self.placement.poll_interval_s / 2,
            )
        except TimeoutError:
            raise TimeoutError(
                f"job {job_id} wrote no endpoint record in {self.config.gate.deadline_s:.0f}s; "
                + self.log_note(shell, log_path)
            ) from None
        key_file = alloc.run_dir / "api_key"
        return ServerHandle(
            engine=self.config.engine.kind,
            run_id=alloc.run_id,
            node=ep["node"],
            host=self.placement.connect_host or ep["node"],
            port=int(ep["port"]),
            pid=int(ep["pid"]),
            server_pid=int(ep["server_pid"]),
            api_key_file=key_file if key_file.exists() else None,
            log_path=Path(log_path),
            served_name=self.config.model.served_name,
            job_id=alloc.job_id,
            restarts=int(ep.get("restarts", 0)),
            workers=[f"{w['node']} {w['host']}:{w['port']}" for w in ep.get("workers", [])],
        )

    # -- tunnel ------------------------------------------------------------------------
    def tunnel(self, handle: ServerHandle) -> Tunnel:
        if self.placement.login is None:
            return super().tunnel(handle)  # on the login node: the compute node is reached directly
        forward = forward_for(handle.run_id, self.placement.login, handle.host, handle.port)
        return Tunnel(base_url=f"http://127.0.0.1:{forward.local_port}", local_port=forward.local_port, forwarded=True)

    # -- watching ----------------------------------------------------------------------
    def check_alive(self, handle: ServerHandle) -> None:
        assert handle.job_id
        shell = self.shell(handle.run_id)
        info = settled_info(shell, handle.job_id)
        if info.terminal:
            raise self._ended(shell, info, str(handle.log_path))

    def time_left_s(self, handle: ServerHandle) -> float | None:
        assert handle.job_id
        out = self.shell(handle.run_id).run(f"squeue -h -j {shlex.quote(handle.job_id)} -o %L 2>/dev/null").stdout
        return slurm.parse_time_left(out)

    def recover(self, alloc: Allocation, handle: ServerHandle) -> tuple[ServerHandle, Tunnel] | None:
        """After failures: if the job was requeued, wait for it and follow its new endpoint."""
        assert handle.job_id and alloc.remote_dir
        shell = self.shell(alloc.run_id)
        info = settled_info(shell, handle.job_id)
        if info.terminal:
            raise self._ended(shell, info, str(handle.log_path))
        if info.running and info.restarts == handle.restarts:
            if not self._server_ending(shell, alloc.remote_dir, handle):
                return None  # same job, same server: the failures were not a requeue
            info = self._job_after_server(shell, handle)
            if info.terminal:
                raise self._ended(shell, info, str(handle.log_path))
        self._wait_running(shell, handle.job_id, alloc.remote_dir)
        new = self.warm(alloc, min_restarts=max(info.restarts, handle.restarts + 1))
        return new, self.tunnel(new)

    def _ended(self, shell: Shell, info: slurm.JobInfo, log_path: str) -> ServerDied:
        """The error for a job that ended under its server: its state, reason and log tail."""
        return ServerDied(f"job {info.job_id} ended {info.state} ({info.reason}); {self.log_note(shell, log_path)}")

    def _server_ending(self, shell: Shell, remote_dir: str, handle: ServerHandle, wait_s: float = 10.0) -> bool:
        """Whether the job's supervisor says its server is gone or going (its registry record),
        watched for ``wait_s``: a server that died takes its job a moment to end, and a client
        that saw the failure first must not take the still-RUNNING job for a live server."""
        deadline = time.monotonic() + wait_s
        while True:
            text = shell.read_file(registry_file(remote_dir))
            try:
                record = json.loads(text) if text else {}
            except ValueError:
                record = {}
            if record.get("restarts", handle.restarts) == handle.restarts and record.get("state") not in (
                None,
                "started",
            ):
                return True
            terminal = job_info(shell, handle.job_id or "").terminal
            if terminal or time.monotonic() > deadline:
                return terminal
            time.sleep(1.0)

    def _job_after_server(self, shell: Shell, handle: ServerHandle, timeout_s: float = 60.0) -> slurm.JobInfo:
        """The job once it ended (settled) or was requeued, after its server went away."""
        assert handle.job_id
        deadline = time.monotonic() + timeout_s
        while True:
            info = settled_info(shell, handle.job_id)
            if info.terminal or info.restarts > handle.restarts or time.monotonic() > deadline:
                return info
            time.sleep(1.0)

    # -- teardown ----------------------------------------------------------------------
    def teardown(self, alloc: Allocation) -> Teardown:
        """Close the forward, scancel, confirm the job is gone; account node- and GPU-hours."""
        run_id = alloc.run_id
        lease = read_lease(alloc.run_dir)
        job_id = alloc.job_id or (lease.job_id if lease else None)
        result = Teardown(run_id=run_id, already_gone=True, released_at=datetime.now(UTC))
        try:
            if job_id:
                result = self._cancel(run_id, job_id, result, alloc.started_at)
            self.forget_secrets(self.shell(run_id), alloc.remote_dir or (lease.remote_dir if lease else None))
            remove_lease(alloc.run_dir)
        finally:
            heartbeat.stop(run_id)
            close_run(run_id)
        return result

    def _cancel(self, run_id: str, job_id: str, result: Teardown, started_at: datetime) -> Teardown:
        """scancel and confirm; the job's node- and GPU-hours from Slurm's run time (× its nodes)."""
        shell = self.shell(run_id)
        before = job_info(shell, job_id)
        final = cancel_and_confirm(shell, job_id)
        elapsed = final.elapsed_s or before.elapsed_s
        if elapsed is None:
            elapsed = (datetime.now(UTC) - started_at).total_seconds()
        node_hours = elapsed * self.placement.nodes / 3600  # a model over K nodes holds all K
        return result.model_copy(
            update={
                "cancelled_job": job_id if not before.terminal else None,
                "already_gone": before.terminal,
                "node_hours": round(node_hours, 6),
                "gpu_hours": round(node_hours * slurm.gpus_in_gres(self.placement.slurm.gres), 6),
            }
        )

    @classmethod
    def release_lease(cls, lease: Lease) -> bool:
        """For ``llmflow cleanup`` and crash hooks: reach the cluster from the lease and cancel its job."""
        if lease.job_id is None:
            return False
        with cls.lease_shell(lease) as shell:
            was_alive = not job_info(shell, lease.job_id).terminal
            cancel_and_confirm(shell, lease.job_id)
            cls.forget_secrets(shell, lease.remote_dir)
            return was_alive

"""Slurm, as data: render the job script, parse sbatch/squeue/scontrol, map job states.

Pure functions (text in, data out) so every rule is unit-tested without a cluster; the
driver in ``llmflow.placements.slurm`` runs the commands.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from pydantic import BaseModel

from llmflow.config import SlurmOptions
from llmflow.engines.base import MultiNodeLaunch
from llmflow.errors import JobRejected
from llmflow.remote.multinode import multinode_start_lines
from llmflow.remote.start_script import server_start_lines

# States after which the job will not run (again) on its own.
TERMINAL = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED_FINAL",
        "GONE",
    }
)
# States in which the job is not running now but may run (again): keep waiting.
WAITING = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "PREEMPTED",
        "SUSPENDED",
        "RESIZING",
        "COMPLETING",
        "STAGE_OUT",
        "SIGNALING",
        "RESV_DEL_HOLD",
    }
)


class JobInfo(BaseModel):
    """What the scheduler says about one job right now."""

    job_id: str
    state: str
    reason: str = ""
    nodes: str = ""
    restarts: int = 0
    elapsed_s: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def describe(self) -> str:
        """``PENDING (Resources)``, ``RUNNING on node2``: the state as a person reads it."""
        if self.running:
            return f"RUNNING on {self.nodes}" if self.nodes else "RUNNING"
        return f"{self.state} ({self.reason})" if self.reason else self.state


def human_duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``: short enough for a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class QueueWatch:
    """Which polls of a waiting job deserve a log line: each change of state, reason or node,
    once, and a reminder every ``remind_every_s`` while nothing changes (a queue that says
    nothing looks like a hang). ``note`` takes the poll's time, so a test can feed it any clock."""

    job_id: str
    remind_every_s: float = 60.0
    _started: float | None = field(default=None, init=False)
    _last: str | None = field(default=None, init=False)
    _last_line_at: float = field(default=0.0, init=False)

    def note(self, info: JobInfo, now: float) -> str | None:
        """The line to log for this poll, or None when it would repeat the last one too soon."""
        if self._started is None:
            self._started = now
        waited = human_duration(now - self._started)
        seen = info.describe()
        if seen != self._last:
            first, self._last, self._last_line_at = self._last is None, seen, now
            if first:
                return f"job {self.job_id}: {seen}"
            return f"job {self.job_id}: {seen} after {waited}" + (" in the queue" if info.running else "")
        if not info.running and now - self._last_line_at >= self.remind_every_s:
            self._last_line_at = now
            return f"job {self.job_id}: still {seen} after {waited}"
        return None


def sbatch_lines(opts: SlurmOptions, job_name: str, log_path: str, nodes: int = 1) -> list[str]:
    """``#SBATCH`` lines; every value is shell-quoted (sbatch parses these lines like a shell).
    A job of several nodes runs one task per node (the head, or one worker)."""
    pairs: list[tuple[str, str | int | None]] = [
        ("job-name", job_name),
        ("output", log_path),
        ("error", log_path),
        ("nodes", nodes if nodes > 1 else None),
        ("ntasks-per-node", 1 if nodes > 1 else None),
        ("partition", opts.partition),
        ("account", opts.account),
        ("qos", opts.qos),
        ("gres", opts.gres),
        ("cpus-per-task", opts.cpus_per_task),
        ("mem", opts.mem),
        ("time", opts.time),
        ("constraint", opts.constraint),
    ]
    lines = [f"#SBATCH --{key}={shlex.quote(str(value))}" for key, value in pairs if value not in (None, "")]
    lines.append("#SBATCH --requeue")
    lines += [f"#SBATCH {shlex.quote(extra)}" for extra in opts.extra_sbatch]  # one option each, quoted whole
    return lines


def render_job_script(
    *,
    opts: SlurmOptions,
    job_name: str,
    run_dir: str,
    setup: list[str],
    server_python: str,
    server_argv: list[str],
    bind_host: str,
    launcher_source: str,
    api_key_env: str | None = "API_KEY",
    registry_file: str | None = None,
    lease_ttl_s: float | None = None,
    multinode: MultiNodeLaunch | None = None,
    nodes: int = 1,
    worker_timeout_s: float = 300.0,
) -> str:
    """The batch script: resources, the user's setup lines, then the supervisor and server.

    The API key is read from the run folder's mode-0600 file into the environment, so it is
    never on a command line. The supervisor's source is embedded (a quoted here-document),
    so nothing of this project has to be installed on the cluster. Given ``multinode`` (and
    ``nodes`` > 1), the head starts a worker on each other node first (``remote.multinode``).
    """
    log_path = f"{run_dir}/slurm-%j.out"
    if multinode is not None:
        body = multinode_start_lines(
            run_dir=run_dir,
            setup=setup,
            server_python=server_python,
            launch=multinode,
            nodes=nodes,
            bind_host=bind_host,
            launcher_source=launcher_source,
            api_key_env=api_key_env,
            registry_file=registry_file,
            lease_ttl_s=lease_ttl_s,
            worker_timeout_s=worker_timeout_s,
        )
        return "\n".join(["#!/bin/bash", *sbatch_lines(opts, job_name, log_path, nodes), *body, ""])
    body = server_start_lines(
        run_dir=run_dir,
        setup=setup,
        server_python=server_python,
        server_argv=server_argv,
        bind_host=bind_host,
        launcher_source=launcher_source,
        api_key_env=api_key_env,
        registry_file=registry_file,
        lease_ttl_s=lease_ttl_s,
    )
    return "\n".join(["#!/bin/bash", *sbatch_lines(opts, job_name, log_path), *body, ""])


def parse_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";")[0].strip()
    if not job_id.isdigit():
        raise JobRejected(f"could not read a job id from sbatch's output: {stdout!r}")
    return job_id


SQUEUE_FORMAT = "%i|%T|%r|%N"


def parse_time_left(text: str) -> float | None:
    """``squeue -o %L`` (time left before the job's limit) in seconds: ``[D-][HH:]MM:SS``;
    None for UNLIMITED, NOT_SET, INVALID or nothing."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


def parse_squeue(job_id: str, stdout: str) -> JobInfo | None:
    """One line of ``squeue -h -j ID -o '%i|%T|%r|%N'``; None when the job is not listed."""
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0] == job_id:
            reason = parts[2] if parts[2] not in ("None", "(null)") else ""
            return JobInfo(job_id=job_id, state=parts[1].strip(), reason=reason, nodes=parts[3].strip())
    return None


_FIELD = re.compile(r"(\w+)=(\S*)")


def parse_scontrol(job_id: str, stdout: str) -> JobInfo | None:
    """``scontrol show job ID``: key=value pairs; None when Slurm no longer knows the job."""
    fields = dict(_FIELD.findall(stdout))
    if fields.get("JobId") != job_id or "JobState" not in fields:
        return None
    reason = fields.get("Reason", "")
    nodes = fields.get("NodeList", "")
    return JobInfo(
        job_id=job_id,
        state=fields["JobState"],
        reason="" if reason in ("None", "(null)") else reason,
        nodes="" if nodes == "(null)" else nodes,
        restarts=int(fields.get("Restarts", "0") or 0),
        elapsed_s=duration_s(fields.get("RunTime", "")),
    )


def parse_sacct(job_id: str, stdout: str) -> JobInfo | None:
    """``sacct -n -P -X -j ID -o JobID,State,Reason,NodeList,ElapsedRaw``."""
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 5 and parts[0] == job_id:
            state = parts[1].split()[0] if parts[1] else "GONE"  # "CANCELLED by 0" -> CANCELLED
            return JobInfo(
                job_id=job_id,
                state=state,
                reason=parts[2],
                nodes=parts[3],
                elapsed_s=float(parts[4]) if parts[4].isdigit() else None,
            )
    return None


def duration_s(text: str) -> float | None:
    """Slurm durations: ``[D-]HH:MM:SS``, ``MM:SS``."""
    if not text or text in ("INVALID", "UNLIMITED"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return float(days * 86400 + h * 3600 + m * 60 + s)


def gpus_in_gres(gres: str | None) -> int:
    """GPUs per node asked for by ``--gres``: ``gpu:v100:2`` -> 2, ``gpu`` -> 1, none -> 0."""
    if not gres:
        return 0
    total = 0
    for item in gres.split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total

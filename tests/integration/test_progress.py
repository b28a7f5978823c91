"""What a person sees while a session starts, and how a hold ends on Ctrl-C.

A new user found a queued Slurm job silent (the job id only at teardown, the run folder never)
and Ctrl-C, the documented way to end ``llmflow hold``, left the flow run Crashed.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from pathlib import Path

import pytest
from prefect import flow

from flows.hold import ENDED_EARLY_STATE
from flows.session import model_session
from llmflow.config import SessionConfig, SlurmOptions
from llmflow.placements.slurm import SlurmDriver
from llmflow.remote.leases import read_lease
from tests.conftest import llama_processes
from tests.integration.conftest import read_until, start_hold
from tests.integration.test_slurm import _jobs_of, slurm_session  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def _hold_runs(runs_dir: Path) -> list:
    """The hold-session flow runs whose session used ``runs_dir``, read back from Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["hold-session"])), limit=200)
    return [r for r in runs if str((r.parameters.get("session") or {}).get("runs_dir")) == str(runs_dir)]


def test_ctrl_c_ends_a_hold_completed_and_leaves_nothing(
    session_config: SessionConfig, tmp_path: Path, prefect_api_url: str
):
    proc = start_hold(session_config, tmp_path, prefect_api_url, "--hours", "1", "--check-every", "1")
    seen = read_until(proc, "held for", 180)
    time.sleep(2.5)  # past a health check or two: the flow sleeps between them
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = seen + rest
    assert proc.returncode == 130, out[-3000:]
    assert "Crash detected" not in out and "interrupted" in out, out[-3000:]
    (run,) = _hold_runs(session_config.runs_dir)
    assert run.state.type.value in ("COMPLETED", "CANCELLED"), run.state
    assert run.state.name == ENDED_EARLY_STATE
    (run_dir,) = session_config.runs_dir.iterdir()
    assert f"its log: {run_dir / 'server.log'}" in out  # said when the server started
    assert llama_processes(str(tmp_path)) == []
    assert read_lease(run_dir) is None


def test_a_queued_slurm_job_is_followed_in_the_log(
    slurm_session: SessionConfig,  # noqa: F811
    tmp_path: Path,
    caplog,
    monkeypatch,
):
    """A job held back by ``--begin``: the log names the job, its run folder and log file on the
    cluster at submission, each queue state once, a reminder while it waits, and its node."""
    slurm_session.placement.slurm = SlurmOptions(extra_sbatch=["--begin=now+6"])
    monkeypatch.setattr(SlurmDriver, "queue_reminder_s", 2.0)

    @flow
    def start() -> str:
        with model_session(slurm_session) as s:
            return str(s.allocation.job_id)

    with caplog.at_level(logging.INFO):
        job = start()
    messages = [r.getMessage() for r in caplog.records]
    host, runs = slurm_session.placement.login.host, tmp_path / "cluster-runs"
    (submitted,) = [m for m in messages if m.startswith(f"submitted Slurm job {job};")]
    assert re.fullmatch(
        rf"submitted Slurm job {job}; run folder {host}:{runs}/(\S+); the job's log: {host}:{runs}/\1/slurm-{job}\.out",
        submitted,
    ), submitted
    queue = [m for m in messages if m.startswith(f"job {job}: ")]
    assert queue[0] == f"job {job}: PENDING (BeginTime)", queue
    assert any(m.startswith(f"job {job}: still PENDING (BeginTime) after ") for m in queue), queue
    assert re.fullmatch(rf"job {job}: RUNNING on node\d after \S+ in the queue", queue[-1]), queue
    assert len(queue) == len(set(queue)), "each state once, not once per poll"
    assert _jobs_of(tmp_path) == []

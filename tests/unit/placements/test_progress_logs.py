"""What the drivers tell a person who waits: queue states once per change, and where the log
is when a server dies. No cluster: the scheduler's answers are a fake sequence."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig, SlurmPlacement, SSHLogin
from llmflow.errors import ServerDied
from llmflow.placements import driver_for
from llmflow.placements import slurm as slurm_driver
from llmflow.placements.slurm_jobs import JobInfo
from llmflow.results import ServerHandle


def _slurm_session(tmp_path: Path, login: SSHLogin | None = None) -> SessionConfig:
    return SessionConfig(
        placement=SlurmPlacement(login=login, poll_interval_s=0.001, queue_deadline_s=60),
        engine=LlamaCppEngine(venv=tmp_path / "venv"),
        model=ModelConfig(path=tmp_path / "m.gguf"),
        runs_dir=tmp_path / "runs",
    )


def test_waiting_for_a_queued_job_logs_each_state_once(tmp_path: Path, monkeypatch, caplog):
    """The queue used to be silent: six polls of three states give three INFO lines."""
    answers = iter(
        [
            JobInfo(job_id="7", state="PENDING", reason="Resources"),
            JobInfo(job_id="7", state="PENDING", reason="Resources"),
            JobInfo(job_id="7", state="PENDING", reason="Resources"),
            JobInfo(job_id="7", state="PENDING", reason="Priority"),
            JobInfo(job_id="7", state="PENDING", reason="Priority"),
            JobInfo(job_id="7", state="RUNNING", nodes="node3"),
        ]
    )
    monkeypatch.setattr(slurm_driver, "job_info", lambda shell, job_id: next(answers))
    log = logging.getLogger("test.progress.slurm")
    driver = driver_for(_slurm_session(tmp_path), log=log)
    with caplog.at_level(logging.INFO, logger=log.name):
        info = driver._wait_running(shell=None, job_id="7", remote_dir="/scratch/runs/r1")  # type: ignore[arg-type]
    assert info.nodes == "node3"
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert [r.levelno for r in caplog.records if r.name == log.name] == [logging.INFO] * 3
    assert lines[0] == "job 7: PENDING (Resources)"
    assert lines[1].startswith("job 7: PENDING (Priority) after ")
    assert lines[2].startswith("job 7: RUNNING on node3 after ") and lines[2].endswith(" in the queue")


def test_remote_paths_are_named_with_their_host(tmp_path: Path):
    over_ssh = driver_for(_slurm_session(tmp_path, SSHLogin(host="della", ssh_config=None)))
    on_login_node = driver_for(_slurm_session(tmp_path))
    assert over_ssh.located("/scratch/r1/slurm-7.out") == "della:/scratch/r1/slurm-7.out"
    assert on_login_node.located("/scratch/r1/slurm-7.out") == "/scratch/r1/slurm-7.out"


def test_a_dead_local_server_names_its_log_file_and_tail(tmp_path: Path):
    """'log tail:' alone left a person hunting for the file; the error names it."""
    log_path = tmp_path / "server.log"
    log_path.write_text("loading model\nerror: not a gguf file\n")
    dead = subprocess.Popen(["true"])  # a finished process: its group is gone
    dead.wait()
    handle = ServerHandle(
        engine="llama_cpp", run_id="r1", node="here", host="127.0.0.1", port=1, pid=dead.pid, log_path=log_path,
        served_name="m",
    )  # fmt: skip
    session = SessionConfig(engine=LlamaCppEngine(venv=tmp_path / "venv"), model=ModelConfig(path=tmp_path / "m"))
    with pytest.raises(ServerDied) as exc:
        driver_for(session).check_alive(handle)
    assert f"log tail ({log_path}):\nloading model\nerror: not a gguf file" in str(exc.value)

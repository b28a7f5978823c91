"""The command line and Prefect's API: on a busy machine, killed outright, and with a local
server kept running (``llmflow server``). Each test has its own PREFECT_HOME and no
PREFECT_API_URL, as a user's first command has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmflow.config import SAMPLE_INPUT
from tests import fault_matrix
from tests.conftest import child_pids, llama_processes, pid_gone, wait_until

pytestmark = pytest.mark.integration

BURN = "while True: pass"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return env


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, text=True, **kw)


def test_demo_completes_while_both_cores_are_busy(tmp_path: Path, request):
    """Two CPU burners per core for the whole run: Prefect's temporary server needs longer than
    its default 20 s to start, and the command still completes."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2 * (os.cpu_count() or 2))]
    started = time.monotonic()
    try:
        out = tmp_path / "out.jsonl"
        proc = _cli(["demo", "-o", str(out), "--runs-dir", str(tmp_path / "runs")], _env(tmp_path),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        output, _ = proc.communicate(timeout=600)
        assert all(b.poll() is None for b in burners), "the machine was not busy for the whole run"
    finally:
        for b in burners:
            b.kill()
            b.wait()
    took = time.monotonic() - started
    assert proc.returncode == 0, output[-3000:]
    assert len(out.read_text().splitlines()) == 240
    row = fault_matrix.record(
        request.node.nodeid, "busy machine", "local", folder=tmp_path, input_path=SAMPLE_INPUT, output_path=out,
        did=f"{len(burners)} CPU burners on {os.cpu_count()} cores for the whole run: Prefect's temporary server "
        f"and the model started slowly, the demo completed in {took:.0f}s",
        final_state="Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["leases_left"]) == (0, 0, 0, 0)


def test_a_killed_command_leaves_no_prefect_server_and_no_model_server(tmp_path: Path, request):
    out = tmp_path / "out.jsonl"
    proc = _cli(["demo", "-o", str(out), "--runs-dir", str(tmp_path / "runs")], _env(tmp_path),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        prefect_servers = child_pids(proc.pid, "uvicorn")
        assert prefect_servers, "no temporary Prefect server found"
        assert llama_processes(str(tmp_path / "runs"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: all(pid_gone(pid) for pid in prefect_servers), 15), (
        "the temporary Prefect server outlived the command"
    )
    deadline = time.monotonic() + 15
    while llama_processes(str(tmp_path / "runs")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_processes(str(tmp_path / "runs")) == []
    done = out.read_text().splitlines()
    assert all(json.loads(line)["custom_id"] for line in done)
    row = fault_matrix.record(
        request.node.nodeid, "flow SIGKILLed, never rerun", "local", folder=tmp_path,
        did=f"{len(done)} lines done before the kill, all intact; the server stopped with its flow (parent watch), "
        "Prefect's temporary server with the command (orphan guard); the lease stays for the next run or cleanup",
        final_state="flow run never ended (killed)",
    )  # fmt: skip
    assert (row["processes_left"], row["leases_left"]) == (0, 1)  # the lease: for the next run or cleanup


def test_a_local_server_is_reused_by_later_commands_and_stopped(tmp_path: Path):
    env, port = _env(tmp_path), str(4300 + os.getpid() % 500)
    started = _cli(["server", "start", "--port", port], env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, _ = started.communicate(timeout=300)
    try:
        assert started.returncode == 0, text
        assert f"http://127.0.0.1:{port}" in text
        status = subprocess.run(
            [sys.executable, "-m", "cli.main", "server", "status"], env=env, capture_output=True, text=True
        )
        assert status.stdout.startswith(f"running: http://127.0.0.1:{port}")
        out = tmp_path / "out.jsonl"
        demo = _cli(["demo", "-o", str(out), "--runs-dir", str(tmp_path / "runs")], env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        text, _ = demo.communicate(timeout=300)
        assert demo.returncode == 0, text
        assert f"Prefect: the local server at http://127.0.0.1:{port}" in text
        assert "Starting temporary server" not in text
    finally:
        stopped = subprocess.run(
            [sys.executable, "-m", "cli.main", "server", "stop"], env=env, capture_output=True, text=True
        )
    assert "stopped the Prefect server" in stopped.stdout
    status = subprocess.run(
        [sys.executable, "-m", "cli.main", "server", "status"], env=env, capture_output=True, text=True
    )
    assert status.stdout.strip() == "not running"
    assert subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True).returncode == 1, (
        "server left running"
    )

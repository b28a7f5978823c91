"""The dead-man switch: a flow SIGKILLed mid-batch, and nothing run afterwards, leaves nothing
burning. Its Slurm job (or ssh-host server) ends by itself within ``lease_ttl_s`` plus one
check, and its OpenSSH forward ends with it; a live hold keeps its server past several ttls."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmflow.config import SessionConfig
from tests import fault_matrix
from tests.conftest import child_pids, llama_processes, pid_gone, wait_until
from tests.integration.test_engines_ssh import ssh_session  # noqa: F401 - fixture
from tests.integration.test_slurm import _jobs_of, slurm_session  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

TTL_S = 10.0


def _input(tmp_path: Path, n: int = 1200) -> Path:
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(n):
            body = {"model": "tiny-llama", "prompt": f"request {i}", "max_tokens": 16}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return src


def _done(tmp_path: Path) -> int:
    """Lines in the output, each checked to be a whole JSON record (a kill tears none)."""
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert all(json.loads(line)["response"]["status_code"] == 200 for line in lines)
    return len(lines)


def _batch_command(session: SessionConfig, tmp_path: Path) -> list[str]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"session": session.model_dump(mode="json")}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if not src.exists():
        _input(tmp_path)
    return [sys.executable, "-m", "cli.main", "batch", str(src), "-o", str(out), "--config", str(config)]


def _rerun(session: SessionConfig, tmp_path: Path, prefect_api_url: str, placement: str, request) -> None:
    """The same command again, after the kill: it releases the dead run's lease and sends only
    what is missing; recorded as "flow SIGKILLed then rerun"."""
    done_before = _done(tmp_path)
    res = subprocess.run(
        _batch_command(session, tmp_path),
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "released a server left by a dead run" in res.stdout + res.stderr
    row = fault_matrix.record(
        request.node.nodeid, "flow SIGKILLed then rerun", placement, folder=tmp_path,
        input_path=tmp_path / "in.jsonl", output_path=tmp_path / "out.jsonl",
        did=f"killed after {done_before} lines (the server then stopped by the dead-man switch); the rerun released "
        "the dead run's lease and sent only the rest",
        final_state="rerun: Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


def _kill_mid_batch(session: SessionConfig, tmp_path: Path, prefect_api_url: str) -> tuple[list[int], float]:
    """Start ``llmflow batch`` on ``session``, SIGKILL it once answers are coming back; its ssh
    masters and the time of the kill."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        _batch_command(session, tmp_path),
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: out.exists() and out.read_text().count("\n") >= 10, 240), "the batch never got going"
        masters = child_pids(proc.pid, " -M -tt ")  # OpenSSH forward masters
        assert masters, "no OpenSSH forward master found"
    finally:
        proc.send_signal(signal.SIGKILL)  # no finally, no hook, no teardown
        proc.wait()
    return masters, time.monotonic()


def test_slurm_job_ends_by_itself_when_its_flow_is_sigkilled(
    slurm_session: SessionConfig,  # noqa: F811
    tmp_path: Path,
    prefect_api_url,
    request,
):
    slurm_session.lease_ttl_s = TTL_S
    masters, killed_at = _kill_mid_batch(slurm_session, tmp_path, prefect_api_url)
    assert wait_until(lambda: all(pid_gone(p) for p in masters), 10), "the ssh forward outlived its flow"
    assert _jobs_of(tmp_path), "the job should still be running right after the kill"
    assert wait_until(lambda: _jobs_of(tmp_path) == [], TTL_S + 20), _jobs_of(tmp_path)
    ended_after = time.monotonic() - killed_at
    print(f"job ended {ended_after:.1f}s after the flow was killed (lease_ttl_s {TTL_S:g})")
    assert ended_after < TTL_S + 1 + 10  # the ttl, one check (1 s here), and Slurm's own bookkeeping
    assert llama_processes(str(tmp_path / "cluster-runs")) == []
    (log,) = (tmp_path / "cluster-runs").glob("*/slurm-*.out")
    assert "no heartbeat from the flow" in log.read_text()
    (record,) = (tmp_path / "cluster-runs" / "registry").glob("*.json")
    assert json.loads(record.read_text())["state"] == "expired"
    row = fault_matrix.record(
        request.node.nodeid, "flow SIGKILLed, never rerun", "slurm", folder=tmp_path,
        did=f"{_done(tmp_path)} lines done before the kill, all intact; the ssh forward ended with the flow, the job "
        f"ended itself {ended_after:.1f}s after the kill (lease_ttl_s {TTL_S:g}); its lease stays for cleanup",
        final_state="flow run never ended (killed); job COMPLETED",
    )  # fmt: skip
    assert (row["processes_left"], row["jobs_left"], row["leases_left"]) == (0, 0, 1)  # the lease: for cleanup
    _rerun(slurm_session, tmp_path, prefect_api_url, "slurm", request)


def test_ssh_host_server_stops_by_itself_when_its_flow_is_sigkilled(
    ssh_session: SessionConfig,  # noqa: F811
    tmp_path: Path,
    prefect_api_url,
    request,
):
    ssh_session.lease_ttl_s = TTL_S
    masters, killed_at = _kill_mid_batch(ssh_session, tmp_path, prefect_api_url)
    assert wait_until(lambda: all(pid_gone(p) for p in masters), 10), "the ssh forward outlived its flow"
    assert llama_processes(str(tmp_path / "host-runs")), "the server should still run right after the kill"
    assert wait_until(lambda: llama_processes(str(tmp_path / "host-runs")) == [], TTL_S + 15)
    ended_after = time.monotonic() - killed_at
    print(f"server ended {ended_after:.1f}s after the flow was killed (lease_ttl_s {TTL_S:g})")
    assert ended_after < TTL_S + 1 + 5
    (log,) = (tmp_path / "host-runs").glob("*/server.log")
    assert "no heartbeat from the flow" in log.read_text()
    row = fault_matrix.record(
        request.node.nodeid, "flow SIGKILLed, never rerun", "ssh", folder=tmp_path,
        did=f"{_done(tmp_path)} lines done before the kill, all intact; the ssh forward ended with the flow, the "
        f"server stopped itself {ended_after:.1f}s after the kill (lease_ttl_s {TTL_S:g}); its lease stays for cleanup",
        final_state="flow run never ended (killed); server stopped",
    )  # fmt: skip
    assert (row["processes_left"], row["leases_left"]) == (0, 1)  # the lease: for cleanup
    _rerun(ssh_session, tmp_path, prefect_api_url, "ssh", request)


def test_a_hold_keeps_its_job_past_several_ttls(
    slurm_session: SessionConfig,  # noqa: F811
    tmp_path: Path,
    prefect_api_url,
):
    slurm_session.lease_ttl_s = 5
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps({"session": slurm_session.model_dump(mode="json")}))
    proc = subprocess.Popen(  # 0.007 h = 25 s: five ttls
        [sys.executable, "-m", "cli.main", "hold", "--hours", "0.007", "--check-every", "2", "--config", str(config)],
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    while "held for" not in seen:
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    base = re.search(r"base URL:\s+(\S+)", seen).group(1)
    key = re.search(r"API key:\s+(\S+)", seen).group(1)
    time.sleep(20)  # four ttls into the hold
    resp = httpx.post(
        base + "/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + rest
    # the job was still running when the hold ended: teardown cancelled it, nothing else had
    assert "tear down: stopped job" in rest, rest
    (log,) = (tmp_path / "cluster-runs").glob("*/slurm-*.out")
    assert "no heartbeat" not in log.read_text()
    assert _jobs_of(tmp_path) == []

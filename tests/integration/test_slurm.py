"""Slurm placement on the real test cluster, through the real sshd and the SSH forward."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows.batch import batch_inference
from flows.session import model_session
from llmflow.config import (
    SAMPLE_INPUT,
    BatchConfig,
    LlamaCppEngine,
    ModelConfig,
    SessionConfig,
    SlurmOptions,
    SlurmPlacement,
    SSHLogin,
)
from llmflow.errors import HostKeyRejected, JobRejected, QueueTimeout, ServerDied
from llmflow.remote.connections import forward_of, tunnel_shell_of
from llmflow.remote.leases import read_lease
from llmflow.remote.shell import SSHShell
from llmflow.remote.tunnel import OpenSSHForward
from tests import fault_matrix
from tests.integration.conftest import read_until, requeue_when_busy, start_hold

pytestmark = pytest.mark.integration


def _login(cluster: dict[str, str], **overrides) -> SSHLogin:
    settings = dict(
        host=cluster["LLMFLOW_TEST_SSH_HOST"],
        port=int(cluster["LLMFLOW_TEST_SSH_PORT"]),
        user=cluster["LLMFLOW_TEST_SSH_USER"],
        key_file=Path(cluster["LLMFLOW_TEST_SSH_KEY"]),
        known_hosts=Path(cluster["LLMFLOW_TEST_KNOWN_HOSTS"]),
        ssh_config=None,
    )
    return SSHLogin(**{**settings, **overrides})


@pytest.fixture
def slurm_session(tmp_path: Path, server_env, test_cluster, prefect_api_url) -> SessionConfig:
    venv, model = server_env
    local_model = tmp_path / "model" / "tiny.gguf"
    local_model.parent.mkdir()
    shutil.copy(model, local_model)
    return SessionConfig(
        placement=SlurmPlacement(
            login=_login(test_cluster),
            remote_runs_dir=str(tmp_path / "cluster-runs"),
            # each test-cluster node has its own loopback address; the server binds its node's
            bind_host="@node",
            poll_interval_s=0.5,
            queue_deadline_s=120,
        ),
        engine=LlamaCppEngine(venv=venv),
        model=ModelConfig(path=local_model),
        runs_dir=tmp_path / "runs",
    )


def _jobs_of(tmp_path: Path) -> list[str]:
    """Jobs still known to squeue whose run folder is under this test's tmp_path."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(tmp_path) in line]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_flow_on_slurm_through_ssh_tunnel(slurm_session: SessionConfig, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    result = batch_inference(session=slurm_session, batch=BatchConfig(output_path=out, concurrency=4))
    records = _records(out)
    n = sum(1 for line in SAMPLE_INPUT.read_text().splitlines() if line.strip())
    assert len(records) == n == result.report.succeeded
    assert {r["response"]["status_code"] for r in records} == {200}
    assert _jobs_of(tmp_path) == []
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_lease(run_dir) is None
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["placement"] == "slurm"


def test_forward_listens_on_loopback_only_and_key_is_enforced(slurm_session: SessionConfig, tmp_path: Path):
    @flow
    def probe() -> dict:
        with model_session(slurm_session) as s:
            forward = forward_of(s.allocation.run_id)
            url = s.tunnel.base_url + "/v1/models"
            return {
                "bind": forward.bind_address[0],
                "forwarded": s.tunnel.forwarded,
                "no_key": httpx.get(url).status_code,
                "key": httpx.get(url, headers={"Authorization": f"Bearer {s.handle.api_key()}"}).status_code,
                "remote_key_mode": oct(Path(s.allocation.remote_dir, "api_key").stat().st_mode & 0o777),
                "after_drop": _status_after_ssh_drop(s, url),
            }

    assert probe() == {
        "bind": "127.0.0.1",
        "forwarded": True,
        "no_key": 401,
        "key": 200,
        "remote_key_mode": "0o600",
        "after_drop": 200,
    }
    assert _jobs_of(tmp_path) == []


def _status_after_ssh_drop(s, url: str) -> int:
    """Cut the tunnel's SSH connection under it; requests must get through again by themselves
    (the OpenSSH forward starts its master again at once; the paramiko one on the next request)."""
    forward = forward_of(s.allocation.run_id)
    if isinstance(forward, OpenSSHForward):
        os.kill(forward.pid, signal.SIGKILL)
    else:
        tunnel_shell_of(s.allocation.run_id)._client.get_transport().close()
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, headers=s.handle.auth_headers(), timeout=30).status_code
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_queue_deadline_cancels_a_job_that_never_starts(slurm_session: SessionConfig, tmp_path: Path, request):
    slurm_session.placement.slurm = SlurmOptions(extra_sbatch=["--hold"])  # pending (JobHeldUser) for ever
    slurm_session.placement.queue_deadline_s = 4
    with pytest.raises(QueueTimeout, match=r"still PENDING \(JobHeldUser\) after 4s in the queue; cancelled"):
        batch_inference(session=slurm_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    assert _jobs_of(tmp_path) == []
    row = fault_matrix.record(
        request.node.nodeid, "pending past deadline", "slurm", folder=tmp_path,
        did="cancelled the job at queue_deadline_s (4 s here), with Slurm's reason (JobHeldUser); nothing sent",
        final_state="Failed (QueueTimeout), exit 1",
    )  # fmt: skip
    assert (row["processes_left"], row["jobs_left"], row["leases_left"]) == (0, 0, 0)


def test_requeue_mid_batch_completes_each_id_once(slurm_session: SessionConfig, tmp_path: Path, request):
    src = tmp_path / "in.jsonl"
    n = 400
    with src.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": "tiny-llama", "prompt": f"request {i}", "max_tokens": 48},
                    }
                )
                + "\n"
            )
    out = tmp_path / "out.jsonl"
    watcher, requeued = requeue_when_busy(out, tmp_path / "runs", at_lines=40)
    batch = BatchConfig(
        input_path=src, output_path=out, concurrency=2, max_attempts=2, backoff_s=0.2, stop_after_failures=2
    )
    result = batch_inference(session=slurm_session, batch=batch)
    watcher.join(5)
    assert requeued.get("at_lines", n) < n, "the requeue did not happen mid-batch"
    ids = Counter(r["custom_id"] for r in _records(out))
    assert len(ids) == n and set(ids.values()) == {1}
    assert {r["response"]["status_code"] for r in _records(out)} == {200}
    assert result.report.succeeded == n
    assert _jobs_of(tmp_path) == []
    row = fault_matrix.record(
        request.node.nodeid, "job requeued", "slurm", folder=tmp_path, input_path=src, output_path=out,
        did=f"requeued after {requeued['at_lines']} of {n} lines; the flow waited for the job to run again, "
        "followed its new endpoint, passed the gate again and resumed",
        final_state="Completed",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


def test_impossible_partition_fails_with_slurms_reason(slurm_session: SessionConfig, tmp_path: Path):
    slurm_session.placement.slurm = SlurmOptions(partition="no-such-partition")
    with pytest.raises(JobRejected, match="invalid partition"):
        batch_inference(session=slurm_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    assert _jobs_of(tmp_path) == []


def test_impossible_resources_fail_with_slurms_reason(slurm_session: SessionConfig, tmp_path: Path):
    slurm_session.placement.slurm = SlurmOptions(mem="100000G")
    with pytest.raises(JobRejected, match="Requested node configuration is not available"):
        batch_inference(session=slurm_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    assert _jobs_of(tmp_path) == []


def test_model_that_fails_to_load_fails_with_log_tail(slurm_session: SessionConfig, tmp_path: Path, request):
    slurm_session.model.path.write_bytes(b"not a gguf file")
    started = time.monotonic()
    with pytest.raises(ServerDied) as exc:
        batch_inference(session=slurm_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    took = time.monotonic() - started
    assert "log tail" in str(exc.value) and "gguf" in str(exc.value).lower()
    assert _jobs_of(tmp_path) == []
    row = fault_matrix.record(
        request.node.nodeid, "model fails to load", "slurm", folder=tmp_path,
        did=f"failed {took:.1f}s after submission (the job ended), with the job's log tail; nothing sent",
        final_state="Failed (ServerDied), exit 1",
    )  # fmt: skip
    assert (row["processes_left"], row["jobs_left"], row["leases_left"]) == (0, 0, 0)


def test_unknown_host_key_is_refused_unless_opted_in(test_cluster, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    with pytest.raises(HostKeyRejected, match="not in .*known_hosts: refusing"):
        SSHShell(_login(test_cluster, known_hosts=empty))
    shell = SSHShell(_login(test_cluster, known_hosts=empty, accept_unknown_host_key=True))
    try:
        assert shell.run("echo ok").stdout.strip() == "ok"
    finally:
        shell.close()
    assert test_cluster["LLMFLOW_TEST_SSH_PORT"] in empty.read_text()  # remembered for next time
    SSHShell(_login(test_cluster, known_hosts=empty)).close()  # and now trusted without opting in


def test_hold_prints_a_working_url_and_key_then_tears_down(
    slurm_session: SessionConfig, tmp_path: Path, prefect_api_url
):
    import re

    proc = start_hold(slurm_session, tmp_path, prefect_api_url, "--hours", "0.005", "--check-every", "2")
    seen = read_until(proc, "held for", 120)
    base = re.search(r"base URL:\s+(\S+)", seen).group(1)
    key = re.search(r"API key:\s+(\S+)", seen).group(1)
    assert base.startswith("http://127.0.0.1:") and "curl -s" in seen and "OpenAI(base_url=" in seen
    resp = httpx.post(
        base + "/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + rest
    assert "session ended after" in rest and "tear down: stopped job" in rest
    assert _jobs_of(tmp_path) == []


def test_campaign_on_slurm_kill_mid_cell_starts_a_new_job(slurm_session: SessionConfig, tmp_path: Path, request):
    """A campaign through the SSH tunnel: the server is SIGKILLed during the second cell, its job
    ends, the cell is crashed, a new job serves the rest; no job is left."""
    from flows.campaign import benchmark_campaign
    from llmflow.bench.config import CampaignConfig
    from tests.conftest import kill_server_during_cell

    out = tmp_path / "campaign"
    session = slurm_session.model_copy(update={"engine": slurm_session.engine.model_copy(update={"n_ctx": 512})})
    campaign = CampaignConfig(
        name="it-slurm",
        context_sizes=[32, 64, 128],
        concurrencies=[1],
        output_tokens=[128],
        rounds=40,
        warmup_requests=0,
        output_dir=out,
    )
    _, killed = kill_server_during_cell(out / "requests.jsonl", "ctx64-c1-out128", tmp_path / "cluster-runs")
    result = benchmark_campaign(session=session, campaign=campaign)
    assert killed
    assert [c.status for c in result.cells] == ["ok", "crashed", "ok"]
    assert [c.session for c in result.cells] == [1, 1, 2] and result.sessions == 2
    assert result.cells[2].summary.completed == 40
    assert _jobs_of(tmp_path) == []
    row = fault_matrix.record(
        request.node.nodeid, "server killed", "slurm", folder=tmp_path,
        did="(a campaign) the server was SIGKILLed mid-cell: the job ended, the cell was recorded crashed, "
        "a new job served the remaining cells (40 of 40 requests ok)",
        final_state="Completed (cells ok, crashed, ok)",
    )  # fmt: skip
    assert (row["processes_left"], row["jobs_left"], row["leases_left"]) == (0, 0, 0)


@pytest.mark.parametrize("mistake", ["JSON array input", "missing input", "typo in a slurm option"])
def test_a_mistake_exits_2_before_any_job_is_submitted(slurm_session: SessionConfig, tmp_path: Path, mistake):
    """The command line checks the input and the whole config on this machine first: no sbatch,
    no run folder on the cluster, no Prefect server."""
    import sys

    config = json.loads(slurm_session.model_dump_json())
    src = tmp_path / "requests.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}) + "\n")
    if mistake == "JSON array input":
        src = tmp_path / "requests.json"
        src.write_text(json.dumps([{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}]))
    elif mistake == "missing input":
        src = tmp_path / "nope.jsonl"
    else:
        config["placement"]["slurm"]["partiton"] = "debug"
    config["placement"]["login"]["key_passphrase"] = None
    path = tmp_path / "slurm.json"
    path.write_text(json.dumps({"session": config}))
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert _jobs_of(tmp_path) == [] and not (tmp_path / "cluster-runs").exists() and not (tmp_path / "runs").exists()

"""Replicas: one batch spread over N real llama.cpp servers, on the multi-node Slurm test
cluster (through the SSH forward) and on this machine; a lost replica replaced, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.batch import batch_inference
from llmflow.config import BatchConfig, LlamaCppEngine, ModelConfig, SessionConfig, SlurmOptions
from llmflow.remote.leases import read_lease
from tests.integration.test_slurm import _jobs_of, slurm_session  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def _input(tmp_path: Path, n: int, max_tokens: int = 4) -> Path:
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(n):
            body = {"model": "tiny", "prompt": f"line {i}", "max_tokens": max_tokens}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return path


def _custom_ids(out: Path) -> Counter:
    return Counter(json.loads(line)["custom_id"] for line in out.read_text().splitlines())


def _lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except FileNotFoundError:
        return 0


class _Watch:
    """Samples, while the batch runs: this test's jobs and their nodes (squeue), and the ssh
    processes that forward to the test sshd (there must be one connection for all replicas)."""

    def __init__(self, tmp_path: Path, ssh_port: str) -> None:
        self.tmp_path, self.ssh_port = str(tmp_path), ssh_port
        self.nodes: dict[str, str] = {}  # job id -> node, while RUNNING
        self.most_ssh_masters = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def running_jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%N|%Z"], capture_output=True, text=True).stdout
        jobs = []
        for line in out.splitlines():
            job, state, node, workdir = line.split("|", 3)
            if self.tmp_path in workdir and state == "RUNNING":
                self.nodes[job] = node
                jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            self.running_jobs()
            masters = subprocess.run(["pgrep", "-f", f"ssh .*-p {self.ssh_port} .*-M -tt"], capture_output=True)
            self.most_ssh_masters = max(self.most_ssh_masters, len(masters.stdout.split()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _whole_node(session: SessionConfig, replicas: int, **update) -> SessionConfig:
    """Each replica's job asks for a whole test node (all its CPUs), as a GPU replica asks for its GPUs."""
    session.placement.slurm = SlurmOptions(cpus_per_task=os.cpu_count() or 1)
    return session.model_copy(update={"replicas": replicas, **update})


def test_three_replicas_on_three_nodes_share_one_batch_exactly_once(
    slurm_session: SessionConfig,  # noqa: F811
    test_cluster,
    tmp_path: Path,
):
    n = 3000
    out = tmp_path / "out.jsonl"
    session = _whole_node(slurm_session, 3)
    watch = _Watch(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])
    try:
        result = batch_inference(
            session=session, batch=BatchConfig(input_path=_input(tmp_path, n), output_path=out, concurrency=12)
        )
    finally:
        watch.stop()
    ids = _custom_ids(out)
    assert len(ids) == n and set(ids.values()) == {1}, "every custom_id exactly once"
    assert result.report.succeeded == n
    assert len(watch.nodes) == 3 and sorted(set(watch.nodes.values())) == ["node1", "node2", "node3"], watch.nodes
    assert watch.most_ssh_masters == 1, "one SSH connection carries every replica's forward"
    served = {e.name: e.answered for e in result.report.endpoints}
    assert len(served) == 3 and all(a > n / 5 for a in served.values()), served
    assert {e.node for e in result.report.endpoints} == {"node1", "node2", "node3"}
    # the registry folder: one record per replica, at its node's own address, stopped at the end
    (set_dir,) = (tmp_path / "cluster-runs").iterdir()
    records = [json.loads(p.read_text()) for p in sorted((set_dir / "registry").glob("*.json"))]
    assert len(records) == 3
    assert {(r["node"], r["host"]) for r in records} == {(f"node{k}", f"127.0.0.1{k}") for k in (1, 2, 3)}
    assert {r["state"] for r in records} == {"stopped"}
    assert _jobs_of(tmp_path) == []
    assert all(read_lease(d) is None for d in (tmp_path / "runs").iterdir())


def test_a_cancelled_replica_is_replaced_and_its_requests_move(
    slurm_session: SessionConfig,  # noqa: F811
    test_cluster,
    tmp_path: Path,
):
    n = 3000
    out = tmp_path / "out.jsonl"
    session = _whole_node(slurm_session, 3, max_replacements=1)
    watch = _Watch(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])
    cancelled: list[str] = []

    def cancel_one_at_a_third() -> None:
        deadline = time.monotonic() + 600
        while _lines(out) < n // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        job = sorted(watch.running_jobs())[0]
        subprocess.run(["scancel", job], check=True)
        cancelled.append(job)

    canceller = threading.Thread(target=cancel_one_at_a_third, daemon=True)
    canceller.start()
    try:  # longer answers: the rest of the batch outlasts finding the lost job and starting a new one
        result = batch_inference(
            session=session,
            batch=BatchConfig(input_path=_input(tmp_path, n, max_tokens=48), output_path=out, concurrency=12),
        )
    finally:
        watch.stop()
        canceller.join(5)
    ids = _custom_ids(out)
    assert len(ids) == n and set(ids.values()) == {1}, "every custom_id exactly once"
    report = result.report
    assert cancelled and report.moved >= 1, report
    by_job = {e.job_id: e for e in report.endpoints}
    assert by_job[cancelled[0]].state == "lost"
    (replacement,) = [e for e in report.endpoints if e.replaces]
    assert replacement.replaces == by_job[cancelled[0]].name and replacement.job_id not in cancelled
    assert replacement.answered > 0 and replacement.seconds_to_ready is not None
    assert _jobs_of(tmp_path) == []


def test_local_replicas_replace_a_killed_server(server_env, prefect_api_url, tmp_path: Path):
    venv, model = server_env
    n = 900
    out = tmp_path / "out.jsonl"
    runs = tmp_path / "runs"
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv), model=ModelConfig(path=model), runs_dir=runs, replicas=2, max_replacements=1
    )
    killed: list[str] = []

    def kill_one_at_a_third() -> None:
        deadline = time.monotonic() + 300
        while _lines(out) < n // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        run_dir = sorted(runs.iterdir())[0]
        lease = read_lease(run_dir)
        os.killpg(lease.pgid, signal.SIGKILL)
        killed.append(run_dir.name)

    killer = threading.Thread(target=kill_one_at_a_third, daemon=True)
    killer.start()
    result = batch_inference(
        session=session, batch=BatchConfig(input_path=_input(tmp_path, n), output_path=out, concurrency=8)
    )
    killer.join(5)
    ids = _custom_ids(out)
    assert len(ids) == n and set(ids.values()) == {1}
    by_name = {e.name: e for e in result.report.endpoints}
    assert killed and by_name[killed[0]].state == "lost"
    (replacement,) = [e for e in result.report.endpoints if e.replaces]
    assert replacement.replaces == killed[0] and replacement.answered > 0
    assert all(read_lease(d) is None for d in runs.iterdir()), "every replica released"

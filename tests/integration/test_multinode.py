"""One model split over nodes (seed 004's reasoning tier): llama.cpp ``rpc-server`` workers on
two nodes of the multi-node Slurm test cluster, under a ``llama-server --rpc`` head on the third,
all in one job; reached through the login node's SSH forward like any Slurm session."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.batch import batch_inference
from llmflow.config import BatchConfig, LlamaServerEngine, ModelConfig, SessionConfig, SlurmPlacement
from llmflow.errors import LLMFlowError
from llmflow.tiny_model import write_tiny_llama
from tests import fault_matrix
from tests.conftest import llama_processes, wait_until
from tests.integration.conftest import requeue_when_busy
from tests.integration.test_slurm import _jobs_of, _login

pytestmark = pytest.mark.integration


def _input(tmp_path: Path, n: int, max_tokens: int) -> Path:
    path = tmp_path / f"in-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            body = {"model": "tiny", "prompt": f"line {i}: the", "max_tokens": max_tokens, "temperature": 0}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return path


def _texts(out: Path) -> dict[str, str]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records}


@pytest.fixture
def rpc_session(tmp_path: Path, llama_server_bin, test_cluster, prefect_api_url) -> SessionConfig:
    """Three nodes: the head on one, an rpc-server on each of the others, half the layers each."""
    model = write_tiny_llama(tmp_path / "model" / "tiny-4-layers.gguf", n_layer=4, seed=4)
    return SessionConfig(
        placement=SlurmPlacement(
            login=_login(test_cluster),
            remote_runs_dir=str(tmp_path / "cluster-runs"),
            bind_host="@node",
            poll_interval_s=0.5,
            queue_deadline_s=120,
            nodes=3,
            worker_start_timeout_s=60,
        ),
        engine=LlamaServerEngine(tensor_split=[1, 1], n_threads=1, rpc_threads=1),
        model=ModelConfig(path=model, served_name="tiny"),
        runs_dir=tmp_path / "runs",
    )


def _endpoint(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "cluster-runs").glob("*/endpoint.json")
    return json.loads(path.read_text())


def test_a_model_split_over_two_rpc_workers_answers_as_on_one_node(rpc_session: SessionConfig, tmp_path: Path):
    src = _input(tmp_path, 200, max_tokens=8)
    out = tmp_path / "out.jsonl"
    # one request at a time on both sides: how concurrent sequences share a batch changes the sums'
    # order, and a random model's near-ties can then flip (seen once in a few runs at 4 in flight)
    result = batch_inference(session=rpc_session, batch=BatchConfig(input_path=src, output_path=out, concurrency=1))
    assert result.report.succeeded == 200 and len(_texts(out)) == 200

    # the head and its two workers were three different nodes, and each worker held the head's connection
    ep = _endpoint(tmp_path)
    assert [w["rank"] for w in ep["workers"]] == [1, 2]
    assert sorted([ep["node"], *(w["node"] for w in ep["workers"])]) == ["node1", "node2", "node3"]
    (run_folder,) = {path.parent for path in (tmp_path / "cluster-runs").glob("*/endpoint.json")}
    for rank in (1, 2):
        assert "Accepted client connection" in (run_folder / "workers" / f"{rank}.log").read_text()
    job_log = next(run_folder.glob("slurm-*.out")).read_text()
    assert "worker 1 listens on" in job_log and "worker 2 listens on" in job_log

    # the same model and prompts on one node, greedy: the same completions
    one_node = SessionConfig(
        engine=LlamaServerEngine(n_threads=1), model=rpc_session.model, runs_dir=tmp_path / "runs-one-node"
    )
    single = tmp_path / "one-node.jsonl"
    batch_inference(session=one_node, batch=BatchConfig(input_path=src, output_path=single, concurrency=1))
    assert _texts(single) == _texts(out)
    assert _jobs_of(tmp_path) == []
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)


def test_a_killed_worker_fails_the_session_naming_its_node_and_a_rerun_resumes(
    rpc_session: SessionConfig, tmp_path: Path, request
):
    n = 1200
    src, out = _input(tmp_path, n, max_tokens=16), tmp_path / "out.jsonl"
    killed: dict = {}

    def kill_worker_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 100:
                (worker,) = (tmp_path / "cluster-runs").glob("*/workers/2.json")
                record = json.loads(worker.read_text())
                os.kill(record["server_pid"], signal.SIGKILL)  # the rpc-server itself (the nodes are this machine)
                killed.update(node=record["node"], at=time.monotonic(), lines=out.read_text().count("\n"))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker_2, daemon=True)
    killer.start()
    batch = BatchConfig(input_path=src, output_path=out, concurrency=4, max_attempts=2, backoff_s=0.1)
    with pytest.raises(LLMFlowError) as exc:
        batch_inference(session=rpc_session, batch=batch)
    failed_after = time.monotonic() - killed["at"]
    killer.join(5)
    assert failed_after < 30, f"the session failed {failed_after:.1f}s after the worker was killed"
    message = str(exc.value)
    assert f"worker 2 on node {killed['node']} ended" in message, message
    assert _jobs_of(tmp_path) == []
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15), llama_processes(str(tmp_path))

    first = sum(1 for _ in out.open())
    result = batch_inference(session=rpc_session, batch=batch)  # a new job; only what is missing is sent
    assert result.report.already_done == first and result.report.succeeded == n - first
    assert Counter(json.loads(line)["custom_id"] for line in out.open()).most_common(1)[0][1] == 1
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "worker of a multi-node model killed", "slurm", folder=tmp_path, input_path=src, output_path=out,
        did=f"3-node job (llama-server head, 2 rpc-server workers): a worker SIGKILLed after {killed['lines']} of {n} lines: the head's supervisor saw "
        f"its srun end, stopped the job and named node {killed['node']} with the worker's log tail; the run failed "
        f"{failed_after:.1f}s after the kill with {first} lines done; the rerun (a new 3-node job) sent the other {n - first}",
        final_state="Failed, exit 1; rerun: Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


def test_a_requeued_multi_node_job_starts_its_workers_again_and_the_batch_resumes(
    rpc_session: SessionConfig, tmp_path: Path
):
    n = 600
    src, out = _input(tmp_path, n, max_tokens=16), tmp_path / "out.jsonl"
    watcher, requeued = requeue_when_busy(out, tmp_path / "runs", at_lines=40)
    batch = BatchConfig(
        input_path=src, output_path=out, concurrency=2, max_attempts=2, backoff_s=0.2, stop_after_failures=2
    )
    result = batch_inference(session=rpc_session, batch=batch)
    watcher.join(5)
    assert requeued.get("at_lines", n) < n, "the requeue did not happen mid-batch"
    ids = Counter(json.loads(line)["custom_id"] for line in out.open())
    assert len(ids) == n and set(ids.values()) == {1}
    assert result.report.succeeded == n - result.report.already_done
    ep = _endpoint(tmp_path)
    assert ep["restarts"] == 1 and [w["rank"] for w in ep["workers"]] == [1, 2]
    assert _jobs_of(tmp_path) == []
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)

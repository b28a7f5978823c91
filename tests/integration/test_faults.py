"""Faults of the server and the data path that other tests do not inject, each measured into
the fault matrix (``tests/fault_matrix.py``): a server that never gets ready, one that answers
a fraction of requests 500 first, one slower than the read timeout on some requests (a
``command``-engine server whose behaviour is the fault), on each placement; and with llama.cpp,
the tunnel cut mid-batch (ssh, Slurm) and the server killed mid-batch (ssh)."""

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
from llmflow.config import BatchConfig, CommandEngine, GateConfig, ModelConfig, SessionConfig, Timeouts
from llmflow.errors import LLMFlowError
from llmflow.remote.connections import forward_of
from llmflow.remote.leases import read_lease
from llmflow.remote.tunnel import OpenSSHForward
from tests import fault_matrix
from tests.conftest import llama_processes, wait_until
from tests.integration.test_engines_ssh import ssh_session  # noqa: F401 - fixture
from tests.integration.test_slurm import slurm_session  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

# never_ready: readiness answers 503 for ever. flaky: every 5th prompt answers 500 on its first
# attempt. slow: every 4th prompt's first attempt takes 2 s (past a 1 s read timeout).
SERVER = """
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
attempts, lock = {}, threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, data):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if mode == "never_ready":
            return self.reply(503, {"error": "loading"})
        self.reply(200, {"object": "list", "data": [{"id": "tiny-llama"}]})

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        n = int(prompt.split()[-1]) if prompt.split()[-1].isdigit() else -1
        with lock:
            attempts[prompt] = attempt = attempts.get(prompt, 0) + 1
        if mode == "flaky" and n % 5 == 0 and attempt == 1:
            return self.reply(500, {"error": "transient"})
        if mode == "slow" and n % 4 == 0 and attempt == 1:
            time.sleep(2.0)
        usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        self.reply(200, {"choices": [{"text": "ok", "index": 0}], "usage": usage})

    def log_message(self, *args):
        pass


ThreadingHTTPServer((host, port), Handler).serve_forever()
"""


def _input(tmp_path: Path, n: int, max_tokens: int = 4) -> Path:
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(n):
            body = {"model": "tiny-llama", "prompt": f"request {i}", "max_tokens": max_tokens}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return src


PLACEMENTS = ["local", "ssh", "slurm"]


def _fault_session(request, placement: str, tmp_path: Path, mode: str, **updates) -> SessionConfig:
    """The fault server on ``placement`` (ssh and slurm: the test sshd and cluster of this machine)."""
    script = tmp_path / "fault_server.py"
    script.write_text(SERVER)
    engine = CommandEngine(argv=["python3", str(script), "{host}", "{port}", mode])
    base = SessionConfig() if placement == "local" else request.getfixturevalue(f"{placement}_session")
    return base.model_copy(
        update={"engine": engine, "model": ModelConfig(path=script), "runs_dir": tmp_path / "runs", **updates}
    )


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_server_that_never_gets_ready_fails_at_the_gate_deadline(placement, tmp_path: Path, prefect_api_url, request):
    session = _fault_session(request, placement, tmp_path, "never_ready", gate=GateConfig(deadline_s=6, interval_s=0.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"server not ready after 6s \(\d+ polls of /v1/models, last status 503\)"):
        batch_inference(
            session=session, batch=BatchConfig(input_path=_input(tmp_path, 5), output_path=tmp_path / "o.jsonl")
        )
    took = time.monotonic() - started
    assert took < 30
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "never-ready server", placement, folder=tmp_path,
        did=f"the gate gave up at its deadline (6 s here; {took:.0f}s from start) naming the last status (503), "
        "and the server was stopped; nothing sent",
        final_state="TimedOut (a Failed state), exit 1",
    )  # fmt: skip
    assert (row["processes_left"], row["jobs_left"], row["leases_left"]) == (0, 0, 0)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_fraction_of_5xx_is_retried_and_every_line_done_once(placement, tmp_path: Path, prefect_api_url, request):
    n = 200
    src, out = _input(tmp_path, n), tmp_path / "out.jsonl"
    result = batch_inference(
        session=_fault_session(request, placement, tmp_path, "flaky"),
        batch=BatchConfig(input_path=src, output_path=out, backoff_s=0.05, backoff_max_s=0.2),
    )
    assert result.report.succeeded == n and result.report.retries == n // 5
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "5xx fraction", placement, folder=tmp_path, input_path=src, output_path=out,
        did=f"{n // 5} of {n} requests answered 500 first: each retried after a backoff, all answered 200",
        final_state="Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_requests_slower_than_the_read_timeout_are_retried_never_written_twice(
    placement, tmp_path: Path, prefect_api_url, request
):
    n = 80
    src, out = _input(tmp_path, n), tmp_path / "out.jsonl"
    result = batch_inference(
        session=_fault_session(request, placement, tmp_path, "slow"),
        batch=BatchConfig(input_path=src, output_path=out, timeouts=Timeouts(read=1.0), backoff_s=0.05),
    )
    # every slow first attempt timed out and was sent again (through a tunnel, now and then another
    # request is delayed past the timeout too)
    assert result.report.succeeded == n and result.report.retries >= n // 4
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "slow server", placement, folder=tmp_path, input_path=src, output_path=out,
        did=f"{n // 4} of {n} requests took 2 s, past a 1 s read timeout: each abandoned and sent again "
        f"({result.report.retries} retries in all), the late answer never written",
        final_state="Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


@pytest.mark.parametrize("placement", ["ssh", "slurm"])
def test_tunnel_cut_mid_batch(placement: str, tmp_path: Path, request):
    session: SessionConfig = request.getfixturevalue(f"{placement}_session")
    n = 600
    src, out = _input(tmp_path, n, max_tokens=16), tmp_path / "out.jsonl"
    cut: dict[str, int] = {}

    def cut_at_a_third() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= n // 3:
                (run_dir,) = (tmp_path / "runs").iterdir()
                forward = forward_of(run_dir.name)
                assert isinstance(forward, OpenSSHForward)
                os.kill(forward.pid, signal.SIGKILL)  # the SSH connection under the tunnel
                cut["at"] = out.read_text().count("\n")
                return
            time.sleep(0.05)

    cutter = threading.Thread(target=cut_at_a_third, daemon=True)
    cutter.start()
    result = batch_inference(session=session, batch=BatchConfig(input_path=src, output_path=out, concurrency=4))
    cutter.join(5)
    assert cut.get("at", n) < n, "the tunnel was not cut mid-batch"
    assert result.report.succeeded == n
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "tunnel cut", placement, folder=tmp_path, input_path=src, output_path=out,
        did=f"the forward's SSH connection killed after {cut['at']} of {n} lines: the forward reconnected on the same "
        f"port, the requests cut off were retried ({result.report.retries} retries)",
        final_state="Completed",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


def test_server_killed_mid_batch_on_ssh_then_rerun(ssh_session: SessionConfig, tmp_path: Path, request):  # noqa: F811
    n = 600
    src, out = _input(tmp_path, n, max_tokens=16), tmp_path / "out.jsonl"
    killed: dict[str, int] = {}

    def kill_at_a_third() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= n // 3:
                (run_dir,) = (tmp_path / "runs").iterdir()
                ep = json.loads((Path(read_lease(run_dir).remote_dir) / "endpoint.json").read_text())
                os.kill(ep["server_pid"], signal.SIGKILL)  # the host is this machine
                killed["at"] = out.read_text().count("\n")
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_at_a_third, daemon=True)
    killer.start()
    batch = BatchConfig(input_path=src, output_path=out, concurrency=4, max_attempts=2, backoff_s=0.1)
    with pytest.raises(LLMFlowError) as exc:
        batch_inference(session=ssh_session, batch=batch)
    killer.join(5)
    first = sum(1 for _ in out.open())
    assert killed and first < n
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    result = batch_inference(session=ssh_session, batch=batch)  # the rerun sends only what is missing
    assert result.report.already_done == first and result.report.succeeded == n - first
    assert Counter(json.loads(line)["custom_id"] for line in out.open()).most_common(1)[0][1] == 1
    assert wait_until(lambda: llama_processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "server killed", "ssh", folder=tmp_path, input_path=src, output_path=out,
        did=f"the server SIGKILLed after {killed['at']} of {n} lines: the pass stopped sending, the run failed "
        f"({type(exc.value).__name__}) with {first} lines done and the server's log tail; the rerun sent the other "
        f"{n - first}",
        final_state="Failed, exit 1; rerun: Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["leases_left"]) == (0, 0, 0, 0)

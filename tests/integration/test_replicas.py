"""Replicas: one batch spread over N real llama.cpp servers, on the multi-node Slurm test
cluster (through the SSH forward) and on this machine; a lost replica replaced, nothing lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from flows.batch import batch_inference
from flows.hold import Reach, _announcers, hold_session, on_ready
from llmflow.config import BatchConfig, LlamaCppEngine, ModelConfig, SessionConfig, SlurmOptions, SSHPlacement
from llmflow.gateway import Gateway
from llmflow.remote.leases import read_lease
from tests import fault_matrix
from tests.integration.conftest import read_until, start_hold
from tests.integration.test_slurm import _jobs_of, _login, slurm_session  # noqa: F401 - the fixture

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
        self.ssh_master_hosts: set[str] = set()  # the host each master connected to (its last argument but one)
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
            masters = subprocess.run(
                ["pgrep", "-af", f"ssh .*-p {self.ssh_port} .*-M -tt"], capture_output=True, text=True
            ).stdout.splitlines()
            self.most_ssh_masters = max(self.most_ssh_masters, len(masters))
            self.ssh_master_hosts |= {line.split()[-3] for line in masters if len(line.split()) > 3}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _whole_node(session: SessionConfig, replicas: int, **update) -> SessionConfig:
    """Each replica's job asks for a whole test node (all its CPUs), as a GPU replica asks for its GPUs.

    The test nodes share this machine's cores, so each server computes on one thread (llama.cpp's
    OpenMP threads otherwise spin and take the CPU from the others): replicas of equal speed."""
    session.placement.slurm = SlurmOptions(cpus_per_task=os.cpu_count() or 1)
    session.engine.n_threads = 1
    session.engine.extra_args = ["--n_threads_batch", "1"]
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
        # 8 in flight per replica: each always has work queued, so each gets its share of the CPU;
        # 48 tokens each: the batch outlasts the seconds between the replicas' gates by far (Slurm
        # may start the third job 3-5 s after the others; at 4 tokens the batch took 8 s on this
        # machine and a late replica got 437 of 3000, at 16 tokens 12 s and 565)
        result = batch_inference(
            session=session,
            batch=BatchConfig(input_path=_input(tmp_path, n, max_tokens=48), output_path=out, concurrency=24),
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
    request,
):
    n = 9000  # 3,000 once all finished (in 18 s) before the replacement was ready
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
            batch=BatchConfig(input_path=_input(tmp_path, n, max_tokens=96), output_path=out, concurrency=12),
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
    row = fault_matrix.record(
        request.node.nodeid, "job cancelled outside", "slurm", folder=tmp_path,
        input_path=tmp_path / "in.jsonl", output_path=out,
        did=f"(3 replicas) scancel of one job a third in: {report.moved} requests moved to the others at once, "
        f"a replacement job served {replacement.answered}",
        final_state="Completed",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["jobs_left"], row["leases_left"]) == (0,) * 5


def test_local_replicas_replace_a_killed_server(server_env, prefect_api_url, tmp_path: Path, request):
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
        run_dir = sorted(runs.glob("*-r[0-9]*"))[0]  # a replica (the set has a folder of its own)
        lease = read_lease(run_dir)
        os.killpg(lease.pgid, signal.SIGKILL)
        killed.append(run_dir.name)

    killer = threading.Thread(target=kill_one_at_a_third, daemon=True)
    killer.start()
    # 32 tokens each: the two thirds after the kill take several seconds, so the replacement
    # (ready about a second after the kill) gets its share; at 4 tokens the batch could end first
    result = batch_inference(
        session=session,
        batch=BatchConfig(input_path=_input(tmp_path, n, max_tokens=32), output_path=out, concurrency=8),
    )
    killer.join(5)
    ids = _custom_ids(out)
    assert len(ids) == n and set(ids.values()) == {1}
    by_name = {e.name: e for e in result.report.endpoints}
    assert killed and by_name[killed[0]].state == "lost"
    (replacement,) = [e for e in result.report.endpoints if e.replaces]
    assert replacement.replaces == killed[0] and replacement.answered > 0
    assert all(read_lease(d) is None for d in runs.iterdir()), "every replica released"
    assert _until(lambda: fault_matrix._processes(str(tmp_path)) == [], 15)
    row = fault_matrix.record(
        request.node.nodeid, "server killed", "local", folder=tmp_path,
        input_path=tmp_path / "in.jsonl", output_path=out,
        did=f"(2 replicas) SIGKILL of one server a third in: {result.report.moved} requests moved to the other, "
        f"a replacement served {replacement.answered}",
        final_state="Completed",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["leases_left"]) == (0, 0, 0, 0)


def _upstreams(conf: Path) -> list[str]:
    return re.findall(r"^\s+server (127\.0\.0\.1:\d+) max_fails", conf.read_text(), flags=re.M)


def _upstreams_if(conf: Path, count: int) -> list[str] | None:
    upstreams = _upstreams(conf)
    return upstreams if len(upstreams) == count else None


def _until(cond, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(every_s)
    return None


def _nginx_running(conf: Path) -> bool:
    return subprocess.run(["pgrep", "-f", f"nginx.*{conf}"], capture_output=True).returncode == 0


def test_gateway_spreads_over_its_upstreams_and_follows_updates(tmp_path: Path):
    """nginx in front of two real HTTP servers: both get requests, a dropped one gets none, nothing left after."""
    servers = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        (root / "who").write_text(name)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers.append((proc, f"127.0.0.1:{port}"))
    try:
        for _, addr in servers:
            assert _until(lambda addr=addr: _answers(f"http://{addr}/who"), 10)
        gateway = Gateway(tmp_path / "gw", "gw-test").start([addr for _, addr in servers])
        with gateway, httpx.Client(base_url=gateway.base_url) as client:
            seen = Counter(client.get("/who").text for _ in range(40))
            assert set(seen) == {"a", "b"}, seen
            gateway.update([servers[1][1]])
            assert Counter(client.get("/who").text for _ in range(20)) == {"b": 20}
            assert gateway.reloads == 1 and read_lease(tmp_path / "gw") is not None
        assert not _nginx_running(gateway.conf) and read_lease(tmp_path / "gw") is None
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, headers: dict | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _hold_in_background(session: SessionConfig, hours: float) -> tuple[threading.Thread, list[Reach], dict]:
    """``hold_session`` in a thread: what it announced (``reached``) and how it ended (``outcome``).
    The caller unregisters the announcer with ``_announcers.remove(reached.append)``."""
    reached: list[Reach] = []
    on_ready(reached.append)
    outcome: dict = {}

    def hold() -> None:
        try:
            outcome["hours"] = hold_session(session=session, hours=hours, check_every_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertions
            outcome["error"] = exc

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    return holder, reached, outcome


def test_hold_with_two_replicas_keeps_one_url_through_a_lost_replica(
    slurm_session: SessionConfig,  # noqa: F811
    test_cluster,
    tmp_path: Path,
):
    session = _whole_node(slurm_session, 2, max_replacements=1)
    holder, reached, outcome = _hold_in_background(session, hours=0.05)  # 3 min: ends by itself
    try:
        reach = _until(lambda: reached[0] if reached else None, 180, 0.2)
        assert reach is not None, outcome
        (set_dir,) = (tmp_path / "runs").glob("*-r0")
        set_id = set_dir.name[: -len("-r0")]
        conf = tmp_path / "runs" / set_id / "nginx.conf"
        first = _until(lambda: _upstreams_if(conf, 2), 120)
        assert first, "both replicas in nginx's upstream"
        headers = {"Authorization": f"Bearer {reach.api_key}"}
        body = {"model": session.model.served_name, "prompt": "hi", "max_tokens": 2}
        with httpx.Client(base_url=reach.base_url, headers=headers, timeout=30) as client:
            statuses = Counter(client.post("/v1/completions", json=body).status_code for _ in range(200))
        assert statuses == {200: 200}
        logs = {p.name: p.read_text().count('"POST /v1/completions HTTP/1.1" 200') for p in
                (tmp_path / "cluster-runs" / set_id).glob("*-r*/slurm-*.out")}  # fmt: skip
        assert len(logs) == 2 and all(n > 0 for n in logs.values()) and sum(logs.values()) >= 200, logs

        # lose one: cancel its job while requests keep going through the URL
        failures, sent, stop = [], [0], threading.Event()

        def post(client: httpx.Client) -> int:
            try:
                return client.post("/v1/completions", json=body).status_code
            except httpx.RemoteProtocolError:
                # nginx's reload closes idle kept-alive client connections; a request sent on one
                # at that instant never reached nginx. Clients retry that (the OpenAI SDK does), once.
                return client.post("/v1/completions", json=body).status_code

        def keep_sending() -> None:
            with httpx.Client(base_url=reach.base_url, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    sent[0] += 1
                    try:
                        if (code := post(client)) != 200:
                            failures.append(code)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    time.sleep(0.05)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        registry = tmp_path / "cluster-runs" / set_id / "registry"
        job = json.loads(sorted(registry.glob("*.json"))[0].read_text())["job_id"]
        subprocess.run(["scancel", job], check=True)
        cancelled_at = time.monotonic()

        def record_of(job_id: str) -> dict:
            return next(
                r for r in (json.loads(p.read_text()) for p in registry.glob("*.json")) if r["job_id"] == job_id
            )

        assert _until(lambda: record_of(job)["state"] != "started", 10), "the registry drops the dead replica"
        assert _until(lambda: len(_upstreams(conf)) == 1, 10 - (time.monotonic() - cancelled_at)), "nginx drops it"
        again = _until(lambda: _upstreams_if(conf, 2), 120)
        stop.set()
        sender.join(35)
        assert again and len(set(again) - set(first)) == 1, "the replacement joins once it passed its gate"
        assert len(list(registry.glob("*.json"))) == 3
        assert sent[0] > 20 and failures == [], failures
    finally:
        _announcers.remove(reached.append)
        holder.join(300)
    assert "error" not in outcome, outcome
    assert _jobs_of(tmp_path) == []
    assert not _nginx_running(conf)
    assert all(read_lease(d) is None for d in (tmp_path / "runs").iterdir())


def _ssh_masters(port: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"ssh .*-p {port} .*-M -tt"], capture_output=True, text=True).stdout
    return out.split()


def _nothing_left(tmp_path: Path, ssh_port: str) -> None:
    """No job, no nginx, no SSH forward, no lease: what every way a replicated session ends must leave."""
    assert _until(lambda: _jobs_of(tmp_path) == [], 30), _jobs_of(tmp_path)
    confs = list((tmp_path / "runs").glob("*/nginx.conf"))
    assert confs and _until(lambda: not any(_nginx_running(c) for c in confs), 30)
    assert _until(lambda: _ssh_masters(ssh_port) == [], 30), _ssh_masters(ssh_port)
    assert all(read_lease(d) is None for d in (tmp_path / "runs").iterdir())


def test_ctrl_c_during_a_replicated_hold_leaves_nothing(
    slurm_session: SessionConfig,  # noqa: F811
    test_cluster,
    prefect_api_url,
    tmp_path: Path,
):
    session = _whole_node(slurm_session, 2)
    proc = start_hold(session, tmp_path, prefect_api_url, "--hours", "1", "--check-every", "2")
    seen = read_until(proc, "base URL:", 600)
    assert "nginx in front of 2 replicas" in seen, seen[-3000:]
    assert len(_jobs_of(tmp_path)) == 2
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    _nothing_left(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])


def test_a_hold_whose_replicas_are_all_lost_fails_and_leaves_nothing(
    slurm_session: SessionConfig,  # noqa: F811
    test_cluster,
    tmp_path: Path,
):
    session = _whole_node(slurm_session, 2, max_replacements=0)
    holder, reached, outcome = _hold_in_background(session, hours=1)
    try:
        assert _until(lambda: reached, 180, 0.2), outcome
        assert _until(lambda: len(_jobs_of(tmp_path)) == 2, 60)
        subprocess.run(["scancel", *[line.split("|")[0] for line in _jobs_of(tmp_path)]], check=True)
        holder.join(120)
    finally:
        _announcers.remove(reached.append)
    assert "every replica was lost" in str(outcome.get("error")), outcome
    _nothing_left(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])


def test_replicas_near_their_time_limit_hand_over_to_successors(
    slurm_session: SessionConfig,  # noqa: F811
    tmp_path: Path,
):
    """Jobs with a one-minute limit and a batch that outlasts it: each replica gets a successor
    ahead of its limit, is drained and cancelled; no job meets its limit, no request fails."""
    n = 6400  # 3600 took 70-80 s on this machine, 4800 once only 68 s: too close to the 70 s the test needs
    out = tmp_path / "out.jsonl"
    session = _whole_node(slurm_session, 2, successor_lead_s=45)
    session.placement.slurm = SlurmOptions(cpus_per_task=os.cpu_count() or 1, time="00:01:00")
    result = batch_inference(
        session=session,
        batch=BatchConfig(input_path=_input(tmp_path, n, max_tokens=400), output_path=out, concurrency=8),
    )
    ids = _custom_ids(out)
    assert len(ids) == n and set(ids.values()) == {1}
    report = result.report
    assert report.wall_s > 70, "the batch must outlast the one-minute limit for this test to mean anything"
    assert report.unfinished == 0 and report.moved == 0, report
    retired = {e.name for e in report.endpoints if e.state == "retired"}
    successors = [e for e in report.endpoints if e.replaces in retired]
    assert len(retired) >= 2 and len(successors) == len(retired), report.endpoints
    assert all(e.answered > 0 for e in report.endpoints if e.state == "retired" or e in successors)
    logs = list((tmp_path / "cluster-runs").glob("*/*-r*/slurm-*.out"))  # a successor cancelled in the queue has none
    assert len(logs) >= len(retired)
    assert not [p for p in logs if "DUE TO TIME LIMIT" in p.read_text()], "no job may reach its time limit"
    assert _jobs_of(tmp_path) == []


def test_ssh_placement_runs_one_replica_on_each_listed_host(test_cluster, server_env, prefect_api_url, tmp_path: Path):
    """``placement.hosts``: replica i on host i. The test has one sshd, so its two "hosts" are two
    logins to it (by address and by name); each replica has its own connection and server."""
    venv, model = server_env
    by_address = _login(test_cluster)
    by_name = by_address.model_copy(update={"host": "localhost", "known_hosts": tmp_path / "known_hosts"})
    (tmp_path / "known_hosts").write_text(
        Path(test_cluster["LLMFLOW_TEST_KNOWN_HOSTS"]).read_text().replace("[127.0.0.1]", "[localhost]")
    )
    session = SessionConfig(
        placement=SSHPlacement(
            login=by_address,
            hosts=[by_address, by_name],
            remote_runs_dir=str(tmp_path / "host-runs"),
            poll_interval_s=0.5,
        ),
        engine=LlamaCppEngine(venv=venv),
        model=ModelConfig(path=model),
        runs_dir=tmp_path / "runs",
        replicas=2,
    )
    out = tmp_path / "out.jsonl"
    watch = _Watch(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])
    try:
        result = batch_inference(session=session, batch=BatchConfig(input_path=_input(tmp_path, 400), output_path=out))
    finally:
        watch.stop()
    ids = _custom_ids(out)
    assert len(ids) == 400 and set(ids.values()) == {1}
    assert all(e.answered > 0 for e in result.report.endpoints) and len(result.report.endpoints) == 2
    assert watch.ssh_master_hosts == {"127.0.0.1", "localhost"}, "a forward to each host"
    assert _ssh_masters(test_cluster["LLMFLOW_TEST_SSH_PORT"]) == []
    assert all(read_lease(d) is None for d in (tmp_path / "runs").iterdir())


STREAMER = """
import asyncio, sys
from aiohttp import web

async def stream(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(5):
        await resp.write(f"data: {i}\\n\\n".encode())
        await asyncio.sleep(0.3)
    await resp.write(b"data: [DONE]\\n\\n")
    return resp

app = web.Application()
app.router.add_post("/v1/completions", stream)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def test_gateway_passes_streams_through_as_they_come(tmp_path: Path):
    """A server that sends an event every 0.3 s: through nginx the first event arrives long before the last."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", STREAMER, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert _until(lambda: _port_open(port), 15)
        with Gateway(tmp_path / "gw", "gw-stream").start([f"127.0.0.1:{port}"]) as gateway:
            started = time.perf_counter()
            arrivals = []
            with httpx.stream("POST", gateway.base_url + "/v1/completions", json={}, timeout=30) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        arrivals.append(time.perf_counter() - started)
        assert len(arrivals) == 6
        assert arrivals[0] < 0.25 and arrivals[-1] > 1.4, arrivals  # not held back until the end
    finally:
        server.kill()
        server.wait()


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False

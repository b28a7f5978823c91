"""`llmflow api` for real: the official OpenAI SDK against the service, whose batches run as flow
runs of the batch deployment on a Prefect server with a process worker, serving the tiny model
with llama-cpp-python. One stack for the module; each test makes its own batches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from llmflow.config import PROJECT_ROOT, SAMPLE_INPUT
from tests.conftest import llama_processes
from tests.integration.prefect_stack import deploy, free_port, postgres, prefect_client, prefect_server_and_worker, stop

pytestmark = pytest.mark.integration

NODE_LIMIT = 2
FINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class Stack:
    env: dict[str, str]
    data_dir: Path
    runs_dir: Path
    url: str
    keys: dict[str, str]
    api: subprocess.Popen | None = None

    def start_api(self) -> None:
        log = (self.data_dir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "api", "serve", "--port", self.url.rsplit(":", 1)[1].split("/")[0]],
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/files", timeout=2)
                return
            except httpx.TransportError:
                assert self.api.poll() is None, self.log_tail()
                assert time.monotonic() < deadline, "the API did not answer in 60 s\n" + self.log_tail()
                time.sleep(0.3)

    def kill_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def log_tail(self) -> str:
        return (self.data_dir / "api.log").read_text()[-4000:]

    def client(self, who: str = "a") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=self.keys[who], max_retries=0, timeout=30)


def _write_config(path: Path, served_name: str, runs_dir: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "session": {
                    "model": {"path": str(PROJECT_ROOT / "models" / "tiny-llama.gguf"), "served_name": served_name},
                    "engine": {"kind": "llama_cpp", "n_ctx": 256},
                    "runs_dir": str(runs_dir),
                    "node_limit": "api-nodes",
                }
            }
        )
    )
    return path


def _create_key(env: dict[str, str], name: str) -> str:
    """What an admin runs: `llmflow api keys create NAME`; the key is printed once."""
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "api", "keys", "create", name],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.search(r"llmflow-[A-Za-z0-9_-]{20,}", out).group(0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, server_env) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("api")
    (root / "prefect-home").mkdir()
    data_dir, runs_dir = root / "data", root / "runs"
    catalog = root / "catalog.toml"
    _write_config(root / "tiny-a.json", "tiny-a-served", runs_dir)
    _write_config(root / "tiny-b.json", "tiny-b-served", runs_dir)
    catalog.write_text('[models.tiny-a]\nconfig = "tiny-a.json"\n\n[models.tiny-b]\nconfig = "tiny-b.json"\n')
    with prefect_server_and_worker(root / "prefect-home", {"PREFECT_WORKER_QUERY_SECONDS": "1"}) as env:
        assert (res := deploy(env)).returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        with prefect_client(env) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="api-nodes", limit=NODE_LIMIT))
        env = {
            **env,
            "LLMFLOW_API_DATA_DIR": str(data_dir),
            "LLMFLOW_API_CATALOG": str(catalog),
            "LLMFLOW_API_MIN_COMPLETION_WINDOW": "5s",
            "LLMFLOW_API_POLL_S": "0.5",
        }
        keys = {who: _create_key(env, f"user-{who}") for who in ("a", "b")}
        s = Stack(env, data_dir, runs_dir, f"http://127.0.0.1:{free_port()}/v1", keys)
        s.start_api()
        try:
            yield s
        finally:
            if s.api is not None:
                stop(s.api)
    assert llama_processes(str(runs_dir)) == [], "a model server outlived the module"


def _lines(
    n: int, model: str = "tiny-a", url: str = "/v1/chat/completions", start: int = 0, max_tokens: int = 4
) -> list[dict]:
    base = [json.loads(raw) for raw in SAMPLE_INPUT.read_text().splitlines()]
    out = []
    for i in range(start, start + n):
        line = {
            **base[i % len(base)],
            "custom_id": f"{model}-{url.removeprefix('/v1/').replace('/', '-')}-{i}",
            "url": url,
        }
        body = {"model": model, "max_tokens": max_tokens}
        if url == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": f"say {i}"}]
        elif url == "/v1/completions":
            body["prompt"] = f"count {i}"
        else:
            body = {"model": model, "input": f"text {i}"}
        line["body"] = body
        out.append(line)
    return out


def _upload(client: openai.OpenAI, tmp_path: Path, lines: list[dict], name: str = "in.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, until: set[str], timeout: float = 300):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in until:
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {timeout:.0f} s"
        time.sleep(0.5)
    return batch


def _records(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _flow_runs(stack: Stack, batch_id: str) -> list:
    with prefect_client(stack.env) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[batch_id])))


def _no_server_left(stack: Stack, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while llama_processes(str(stack.runs_dir)):
        assert time.monotonic() < deadline, f"servers left: {llama_processes(str(stack.runs_dir))}"
        time.sleep(0.5)


def test_round_trip_with_the_openai_sdk(stack: Stack, tmp_path: Path):
    a = stack.client("a")
    assert [m.id for m in a.models.list()] == ["tiny-a", "tiny-b"]  # the catalog's names
    lines = _lines(30)
    input_id = _upload(a, tmp_path, lines)
    batch = a.batches.create(
        input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "rt"}
    )
    assert batch.status == "validating" and batch.metadata == {"job": "rt"}
    batch = _wait(a, batch.id, FINAL)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (30, 30, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    records = _records(a, batch.output_file_id)
    by_id = {r["custom_id"]: r for r in records}
    assert len(records) == len(by_id) == 30 and set(by_id) == {line["custom_id"] for line in lines}
    for r in records:
        assert r["response"]["status_code"] == 200 and r["error"] is None
        assert r["response"]["body"]["model"] == "tiny-a-served"  # the catalog name was served by its model
    # the batch ran as a flow run of the batch deployment, found by its batch id
    runs = _flow_runs(stack, batch.id)
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    with prefect_client(stack.env) as client:
        assert client.read_deployment(runs[0].deployment_id).name == "batch"
    # another key sees none of it
    b = stack.client("b")
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(batch.output_file_id)
    assert batch.id not in [x.id for x in b.batches.list()]
    _no_server_left(stack)


def test_bad_lines_fail_the_batch_naming_each_line_and_start_nothing(stack: Stack, tmp_path: Path):
    a = stack.client("a")
    lines = [json.dumps(line) for line in _lines(5)]
    lines[1] = "{not json"
    lines[3] = json.dumps({**json.loads(lines[3]), "body": {"model": "gpt-9", "messages": []}})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as f:
        input_id = a.files.create(file=f, purpose="batch").id
    batch = _wait(
        a, a.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h").id, FINAL
    )
    assert batch.status == "failed" and batch.failed_at
    errors = {e.line: e for e in batch.errors.data}
    assert set(errors) == {2, 4}, batch.errors
    assert "not valid JSON" in errors[2].message and "gpt-9" in errors[4].message
    assert _flow_runs(stack, batch.id) == []


def test_mixed_endpoints_and_two_catalog_models_in_one_batch(stack: Stack, tmp_path: Path):
    a = stack.client("a")
    lines = (
        _lines(6, "tiny-a", "/v1/chat/completions")
        + _lines(6, "tiny-a", "/v1/completions")
        + _lines(6, "tiny-a", "/v1/embeddings")
        + _lines(6, "tiny-b", "/v1/chat/completions")
    )
    batch = a.batches.create(
        input_file_id=_upload(a, tmp_path, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = _wait(a, batch.id, FINAL)
    assert batch.status == "completed" and batch.request_counts.completed == 24, batch.errors
    by_id = {r["custom_id"]: r for r in _records(a, batch.output_file_id)}
    assert set(by_id) == {line["custom_id"] for line in lines}
    assert {by_id[f"tiny-b-chat-completions-{i}"]["response"]["body"]["model"] for i in range(6)} == {"tiny-b-served"}
    assert all("embedding" in by_id[f"tiny-a-embeddings-{i}"]["response"]["body"]["data"][0] for i in range(6))
    assert sorted(t for r in _flow_runs(stack, batch.id) for t in r.tags if t.startswith("model:")) == [
        "model:tiny-a",
        "model:tiny-b",
    ]


def _running_batch(stack: Stack, tmp_path: Path, n: int, window: str = "24h", max_tokens: int = 4):
    """A batch that has answered at least 10 lines; longer answers make it run longer."""
    a = stack.client("a")
    lines = _lines(n, max_tokens=max_tokens)
    batch = a.batches.create(
        input_file_id=_upload(a, tmp_path, lines), endpoint="/v1/chat/completions", completion_window=window
    )
    deadline = time.monotonic() + 180
    while (batch := a.batches.retrieve(batch.id)).request_counts.completed < 10:
        assert batch.status == "in_progress" or batch.status == "validating", batch
        assert time.monotonic() < deadline, "the batch did not get going in 180 s"
        time.sleep(0.3)
    return a, batch


def _check_partial(a: openai.OpenAI, batch, n: int, code: str) -> None:
    done = _records(a, batch.output_file_id)
    unanswered = _records(a, batch.error_file_id)
    assert 10 <= len(done) < n
    assert {r["custom_id"] for r in done}.isdisjoint(r["custom_id"] for r in unanswered)
    assert len(done) + len(unanswered) == n
    assert {r["error"]["code"] for r in unanswered} == {code}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(done), len(unanswered))


def test_cancel_while_it_runs(stack: Stack, tmp_path: Path):
    a, batch = _running_batch(stack, tmp_path, 3000, max_tokens=32)
    assert a.batches.cancel(batch.id).status == "cancelling"
    batch = _wait(a, batch.id, FINAL, timeout=120)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    _check_partial(a, batch, 3000, "batch_cancelled")
    assert [r.state.type.value for r in _flow_runs(stack, batch.id)] == ["CANCELLED"]
    _no_server_left(stack)


def test_a_short_completion_window_expires_with_partial_output(stack: Stack, tmp_path: Path):
    # sized to outlast the window several times over: 3,000 lines once all finished in 18 s of the 20
    a, batch = _running_batch(stack, tmp_path, 12000, window="20s", max_tokens=32)
    batch = _wait(a, batch.id, FINAL, timeout=120)
    assert batch.status == "expired" and batch.expired_at and batch.expired_at >= batch.expires_at, batch
    _check_partial(a, batch, 12000, "batch_expired")
    _no_server_left(stack)


def test_the_api_killed_mid_batch_and_started_again_finishes_it(stack: Stack, tmp_path: Path):
    a, batch = _running_batch(stack, tmp_path, 1500)
    stack.kill_api()
    time.sleep(2)
    stack.start_api()
    batch = _wait(a, batch.id, FINAL)
    assert batch.status == "completed" and batch.request_counts.completed == 1500, batch
    assert len({r["custom_id"] for r in _records(a, batch.output_file_id)}) == 1500
    assert len(_flow_runs(stack, batch.id)) == 1  # the same flow run went on; the restart started no other


def _sessions_serving(runs_dir: Path) -> set[int]:
    """Pids of the supervisors of llama-cpp-python servers started in ``runs_dir``, one per
    session: the process whose command line names both. A supervisor's child between its fork
    and its exec has the same command line for a moment; it is not counted (its parent is)."""
    matching: dict[int, int] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(runs_dir) in text and "llama_cpp.server" in text:
                stat = (cmdline.parent / "stat").read_text()
                matching[int(cmdline.parent.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # pid -> ppid
        except (OSError, ValueError, IndexError):
            continue
    return {pid for pid, ppid in matching.items() if ppid not in matching}


def test_twenty_batches_from_four_clients_within_the_node_limit(stack: Stack, tmp_path: Path):
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(_sessions_serving(stack.runs_dir)))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def client_work(c: int) -> list[str]:
        a = stack.client("a")
        ids = []
        for k in range(5):
            lines = _lines(4, start=100 * c + 10 * k)
            ids.append(
                a.batches.create(
                    input_file_id=_upload(a, tmp_path, lines, f"c{c}-{k}.jsonl"),
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                ).id
            )
        return ids

    try:
        with ThreadPoolExecutor(4) as pool:
            ids = [i for batch_ids in pool.map(client_work, range(4)) for i in batch_ids]
        a = stack.client("a")
        finals = [_wait(a, i, FINAL, timeout=900) for i in ids]
    finally:
        stop.set()
        watcher.join()
    assert [b.status for b in finals] == ["completed"] * 20
    assert all(b.request_counts.completed == 4 for b in finals)
    assert 1 <= peak[0] <= NODE_LIMIT, f"{peak[0]} servers ran at once; the node limit is {NODE_LIMIT}"


def test_the_service_keeps_its_state_in_postgresql(stack: Stack, tmp_path: Path):
    with postgres() as (db_url, psql):
        env = {**stack.env, "LLMFLOW_API_DATABASE_URL": db_url, "LLMFLOW_API_DATA_DIR": str(tmp_path / "data")}
        pg = Stack(env, tmp_path / "data", stack.runs_dir, f"http://127.0.0.1:{free_port()}/v1", {})
        pg.data_dir.mkdir()
        pg.keys["a"] = _create_key(env, "pg-user")
        pg.start_api()
        try:
            a = pg.client("a")
            batch = a.batches.create(
                input_file_id=_upload(a, tmp_path, _lines(5, "tiny-b")),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            batch = _wait(a, batch.id, FINAL)
            assert batch.status == "completed" and batch.request_counts.completed == 5, batch
        finally:
            stop(pg.api)
        rows = subprocess.run(
            [*psql, f"select status, completed from batches where id = '{batch.id}'"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert rows == "completed|5"
        assert not list(pg.data_dir.glob("*.db")), "the service fell back to SQLite"

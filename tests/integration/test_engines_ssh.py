"""Real servers behind the other engines and the ssh placement: llama.cpp's native llama-server
(built from source by scripts/build_llama_server.sh), any OpenAI-style command, and a server
started over SSH on the loopback test sshd from scripts/test_cluster.sh."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows.batch import batch_inference
from flows.session import model_session
from llmflow.config import (
    SAMPLE_INPUT,
    BatchConfig,
    CommandEngine,
    LlamaCppEngine,
    LlamaServerEngine,
    ModelConfig,
    SessionConfig,
    SSHPlacement,
)
from llmflow.errors import ServerDied
from llmflow.placements import release_leftovers
from llmflow.placements.ssh import SSHDriver
from tests import fault_matrix
from tests.conftest import llama_processes, orphan_lease
from tests.integration.test_slurm import _login

pytestmark = pytest.mark.integration


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _small_input(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(SAMPLE_INPUT.read_text().splitlines(keepends=True)[:n]))
    return src


def _wait_no_processes(marker: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := llama_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _model_copy(tmp_path: Path, model: Path) -> Path:
    """A copy inside tmp_path, so every server process of the test names tmp_path and can be found."""
    local = tmp_path / "model" / "tiny.gguf"
    local.parent.mkdir(exist_ok=True)
    shutil.copy(model, local)
    return local


def _key_probe(session: SessionConfig, path: str = "/v1/models") -> tuple[int, int]:
    @flow
    def probe() -> tuple[int, int]:
        with model_session(session) as s:
            url = s.tunnel.base_url + path
            without = httpx.get(url).status_code
            with_key = httpx.get(url, headers={"Authorization": f"Bearer {s.handle.api_key()}"}).status_code
            return without, with_key

    return probe()


# -- llama-server ------------------------------------------------------------------------------


@pytest.fixture
def llama_server_session(llama_server_bin, server_env, tmp_path: Path, prefect_api_url) -> SessionConfig:
    _, model = server_env
    return SessionConfig(
        engine=LlamaServerEngine(binary=llama_server_bin, n_threads=2, parallel=4),
        model=ModelConfig(path=_model_copy(tmp_path, model)),
        runs_dir=tmp_path / "runs",
    )


def test_llama_server_batch_fixed_length_and_its_own_counters(llama_server_session: SessionConfig, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=llama_server_session,
        batch=BatchConfig(input_path=_small_input(tmp_path, 60), output_path=out, concurrency=4, fixed_output_tokens=8),
    )
    records = _records(out)
    assert len(records) == 60 == result.report.succeeded
    assert {r["response"]["status_code"] for r in records} == {200}
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in records} == {8}  # ignore_eos
    # every answer carries the server's own timings; its /metrics counters agree with the usage sums
    assert all(r["response"]["body"]["timings"]["predicted_n"] == 8 for r in records)
    report, timings, counters = result.report, result.report.server_timings, result.report.server_counters
    assert timings["predicted_n"] == report.completion_tokens == counters["generation_tokens"]
    assert timings["decode_tok_per_s"] > 0 and timings["prefill_tok_per_s"] > 0
    # llama-server counts only the prompt tokens it computed; the rest came from its prefix cache
    assert counters["prompt_tokens"] == timings["prompt_n"]
    assert timings["prompt_n"] + timings["cache_n"] == report.prompt_tokens
    assert _wait_no_processes(str(tmp_path)) == []


def test_llama_server_embeddings_beside_completions(llama_server_session: SessionConfig, tmp_path: Path):
    """With /v1/embeddings lines in the input the flow adds --embeddings; completions and chat still
    answer (llama-server's --help says the flag restricts it to embeddings: it does not). The tiny
    generative model has no pooling of its own, so the session sets one."""
    session = llama_server_session.model_copy(
        update={"engine": llama_server_session.engine.model_copy(update={"pooling": "mean"})}
    )
    lines = []
    for i in range(3):
        lines += [
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"hi {i}", "max_tokens": 4}},
            {"custom_id": f"h{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 4}},
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": [f"embed {i}", "and this"]}},
        ]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    result = batch_inference(session=session, batch=BatchConfig(input_path=src, output_path=out, concurrency=3))
    records = {r["custom_id"]: r for r in _records(out)}
    assert len(records) == 9 == result.report.succeeded
    assert {r["response"]["status_code"] for r in records.values()} == {200}
    for cid in ("e0", "e1", "e2"):
        data = records[cid]["response"]["body"]["data"]
        assert len(data) == 2 and all(isinstance(x, float) for x in data[0]["embedding"])  # one pooled vector each
    assert result.report.completion_tokens == sum(
        r["response"]["body"]["usage"].get("completion_tokens", 0) for r in records.values()
    )
    assert _wait_no_processes(str(tmp_path)) == []


def test_llama_server_key_is_enforced(llama_server_session: SessionConfig, tmp_path: Path):
    assert _key_probe(llama_server_session) == (401, 200)
    assert _wait_no_processes(str(tmp_path)) == []


def test_llama_server_missing_model_fails_at_once_with_its_error(
    llama_server_session: SessionConfig, test_cluster, tmp_path: Path
):
    """On this machine a missing model is caught before anything starts (preflight); on a remote
    host only the server can tell, so the gate must fail as soon as it exits, with its own line."""
    missing = tmp_path / "no-such-model.gguf"
    llama_server_session.model.path = missing
    with pytest.raises(ValueError, match=r"model\.path: .*no-such-model\.gguf does not exist"):
        batch_inference(session=llama_server_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    remote = llama_server_session.model_copy(
        update={"placement": SSHPlacement(login=_login(test_cluster), remote_runs_dir=str(tmp_path / "host-runs"))}
    )
    started = time.monotonic()
    with pytest.raises(ServerDied) as exc:
        batch_inference(session=remote, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    took = time.monotonic() - started
    assert took < remote.gate.deadline_s / 10, f"took {took:.0f}s"
    assert "log tail" in str(exc.value) and "failed to load model" in str(exc.value)
    assert _wait_no_processes(str(tmp_path)) == []


# -- command -----------------------------------------------------------------------------------


def test_command_engine_serves_any_openai_style_server(server_env, tmp_path: Path, prefect_api_url):
    """llama-cpp-python's server, but described only as a command line, a readiness path and a key variable."""
    venv, model = server_env
    engine = CommandEngine(
        argv=[
            str(venv / "bin" / "python"),
            "-m",
            "llama_cpp.server",
            "--model",
            "{model}",
            "--model_alias",
            "{served_name}",
            "--host",
            "{host}",
            "--port",
            "{port}",
        ],
        readiness_path="/v1/models",
        api_key_env="API_KEY",
        fixed_length=["min_tokens"],
    )
    session = SessionConfig(
        engine=engine, model=ModelConfig(path=_model_copy(tmp_path, model)), runs_dir=tmp_path / "runs"
    )
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=session,
        batch=BatchConfig(input_path=_small_input(tmp_path, 20), output_path=out, fixed_output_tokens=6),
    )
    records = _records(out)
    assert len(records) == 20 == result.report.succeeded
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in records} == {6}
    assert _key_probe(session) == (401, 200)
    assert _wait_no_processes(str(tmp_path)) == []


# -- ssh placement -----------------------------------------------------------------------------


@pytest.fixture
def ssh_session(test_cluster, server_env, tmp_path: Path, prefect_api_url) -> SessionConfig:
    venv, model = server_env
    return SessionConfig(
        placement=SSHPlacement(
            login=_login(test_cluster), remote_runs_dir=str(tmp_path / "host-runs"), poll_interval_s=0.5
        ),
        engine=LlamaCppEngine(venv=venv),
        model=ModelConfig(path=_model_copy(tmp_path, model)),
        runs_dir=tmp_path / "runs",
    )


def test_ssh_placement_starts_a_real_server_tunnels_and_stops_it(ssh_session: SessionConfig, tmp_path: Path):
    seen: dict[str, object] = {}

    @flow
    def run() -> int:
        with model_session(ssh_session) as s:
            seen["forwarded"] = s.tunnel.forwarded
            seen["processes"] = llama_processes(str(tmp_path / "host-runs"))  # the supervisor started over SSH
            url = s.tunnel.base_url + "/v1/models"
            seen["keyless"] = httpx.get(url).status_code
        return 0

    run()
    assert seen["forwarded"] is True and seen["keyless"] == 401
    assert seen["processes"], "no server process was started on the host"
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=ssh_session, batch=BatchConfig(input_path=_small_input(tmp_path, 30), output_path=out)
    )
    assert result.report.succeeded == 30 == len(_records(out))
    assert {r["response"]["status_code"] for r in _records(out)} == {200}
    assert _wait_no_processes(str(tmp_path)) == []
    key_files = list((tmp_path / "host-runs").glob("*/api_key"))
    assert key_files and all(f.stat().st_mode & 0o077 == 0 for f in key_files)


def test_ssh_server_that_dies_fails_with_its_log(ssh_session: SessionConfig, tmp_path: Path, request):
    ssh_session.model.path.write_bytes(b"GGUF but not really a model")
    started = time.monotonic()
    with pytest.raises(ServerDied) as exc:
        batch_inference(session=ssh_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    took = time.monotonic() - started
    assert "log tail" in str(exc.value) and "gguf" in str(exc.value).lower()
    assert _wait_no_processes(str(tmp_path)) == []
    row = fault_matrix.record(
        request.node.nodeid, "model fails to load", "ssh", folder=tmp_path,
        did=f"failed {took:.1f}s after start (the server exited on the host), with its log tail; nothing sent",
        final_state="Failed (ServerDied), exit 1",
    )  # fmt: skip
    assert (row["processes_left"], row["leases_left"]) == (0, 0)


def test_a_dead_runs_ssh_server_is_stopped_by_cleanup(ssh_session: SessionConfig, tmp_path: Path):
    driver = SSHDriver(ssh_session)
    alloc = driver.allocate("dead-run")
    driver.warm(alloc)
    assert llama_processes(str(tmp_path / "host-runs")), "the server should be running on the host"
    lease_file = orphan_lease(alloc.run_dir)  # as if its flow process had been killed
    released = release_leftovers(ssh_session.runs_dir)
    assert [lease.run_id for lease in released] == ["dead-run"]
    assert _wait_no_processes(str(tmp_path)) == [] and not lease_file.exists()
    again = driver.teardown(alloc)  # teardown after a cleanup: nothing left, no error
    assert again.already_gone

"""End to end against the real llama-cpp-python server and a real Prefect API: no mocks."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows.batch import batch_inference
from flows.session import model_session
from llmflow.config import SAMPLE_INPUT, BatchConfig, SessionConfig
from llmflow.errors import ConfigError, ServerDied
from tests import fault_matrix
from tests.conftest import llama_processes

pytestmark = pytest.mark.integration


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_no_processes(marker: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := llama_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_batch_flow_end_to_end(session_config: SessionConfig, tmp_path: Path):
    out = tmp_path / "out" / "result.jsonl"
    batch = BatchConfig(input_path=SAMPLE_INPUT, output_path=out, concurrency=4, fixed_output_tokens=8)
    result = batch_inference(session=session_config, batch=batch)

    records = _records(out)
    n_input = sum(1 for line in SAMPLE_INPUT.read_text().splitlines() if line.strip())
    assert len(records) == n_input == result.report.succeeded
    assert {r["response"]["status_code"] for r in records} == {200}
    assert sorted(r["custom_id"] for r in records) == sorted(
        json.loads(x)["custom_id"] for x in SAMPLE_INPUT.read_text().splitlines()
    )
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in records} == {8}  # min_tokens honoured
    assert result.report.completion_tokens == 8 * n_input

    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["throughput"]["requests"] == n_input and summary["throughput"]["output_tok_per_s"] > 0

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    key_file = run_dir / "api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    assert not (run_dir / "lease.json").exists()
    assert _wait_no_processes(str(tmp_path)) == []
    # the key is nowhere but its own file: not in the log, the summary, the output or any persisted result
    storage = Path(os.environ["PREFECT_HOME"])
    for path in [run_dir / "server.log", *out.parent.iterdir(), *storage.rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"API key leaked into {path}"


def test_api_key_is_enforced(session_config: SessionConfig, tmp_path: Path):
    @flow
    def probe() -> tuple[int, int]:
        with model_session(session_config) as s:
            url = s.tunnel.base_url + "/v1/models"
            without = httpx.get(url).status_code
            with_key = httpx.get(url, headers={"Authorization": f"Bearer {s.handle.api_key()}"}).status_code
            return without, with_key

    assert probe() == (401, 200)
    assert _wait_no_processes(str(tmp_path)) == []


def test_broken_model_fails_fast_with_the_servers_error(session_config: SessionConfig, tmp_path: Path, request):
    session_config.model.path.write_bytes(b"GGUF but not really a model")
    started = time.monotonic()
    with pytest.raises(ServerDied) as exc:
        batch_inference(session=session_config, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    took = time.monotonic() - started
    assert took < session_config.gate.deadline_s / 4
    assert "log tail" in str(exc.value) and "gguf" in str(exc.value).lower()
    assert _wait_no_processes(str(tmp_path)) == []
    row = fault_matrix.record(
        request.node.nodeid, "model fails to load", "local", folder=tmp_path,
        did=f"failed {took:.1f}s after start (server exited), with the server's log tail; nothing sent",
        final_state="Failed (ServerDied), exit 1",
    )  # fmt: skip
    assert (row["processes_left"], row["leases_left"]) == (0, 0)


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, **kw)


@pytest.fixture
def cli_env(prefect_api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api_url}


def test_invalid_lines_are_reported_and_valid_ones_complete(session_config, tmp_path: Path, cli_env):
    src = tmp_path / "in.jsonl"
    good = [
        json.dumps(
            {
                "custom_id": f"g{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "tiny-llama", "prompt": f"hi {i}", "max_tokens": 4},
            }
        )
        for i in range(5)
    ]
    src.write_text("\n".join([good[0], "{broken", good[1], good[2], good[1], good[3], good[4]]) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _cli(
        [
            "batch",
            str(src),
            "-o",
            str(out),
            "--runs-dir",
            str(session_config.runs_dir),
            "--model",
            str(session_config.model.path),
        ],
        cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, stdout
    assert sorted(r["custom_id"] for r in _records(out)) == [f"g{i}" for i in range(5)]
    errors = {e["line"]: e for e in _records(tmp_path / "out.errors.jsonl")}
    assert set(errors) == {2, 5}
    assert "not valid JSON" in errors[2]["reason"]
    assert "duplicate custom_id 'g1'" in errors[5]["reason"]
    assert "2 invalid input lines" in stdout


def _flow_run_states(output: Path) -> list[tuple[str, str]]:
    """(state type, state name) of the batch flow runs that wrote ``output``, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=200)
    return [
        (r.state.type.value, r.state.name)
        for r in runs
        if (r.parameters.get("batch") or {}).get("output_path") == str(output)
    ]


def test_a_line_the_server_always_refuses_ends_finished_with_failures(session_config, tmp_path: Path, cli_env):
    """llama-cpp-python answers 500 to ``max_tokens: -1`` on every attempt: that is the line's
    answer, so the run finishes (exit 3, "Finished with failures"), every other line done once;
    ``--retry-errors`` sends only that line again."""
    src = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": f"g{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny-llama", "prompt": f"hi {i}", "max_tokens": 4}}
        for i in range(12)
    ]  # fmt: skip
    lines.insert(5, {**lines[0], "custom_id": "refused", "body": {"prompt": "x", "max_tokens": -1}})
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    args = ["batch", str(src), "-o", str(out), "--runs-dir", str(session_config.runs_dir)]
    args += ["--model", str(session_config.model.path)]
    proc = _cli(args, cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, stdout
    assert "finished with failures" in stdout and "1 answered with an error" in stdout
    records = _records(out)
    assert Counter(r["custom_id"] for r in records) == Counter(line["custom_id"] for line in lines)
    assert {r["custom_id"]: r["response"]["status_code"] for r in records}["refused"] == 500
    assert all(r["response"]["status_code"] == 200 for r in records if r["custom_id"] != "refused")
    (error,) = _records(tmp_path / "out.errors.jsonl")
    assert error["line"] == 6 and error["reason"].startswith("answered HTTP 500")
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["batch"]["failed_statuses"] == {"500": 1}
    assert _flow_run_states(out) == [("COMPLETED", "Finished with failures")]

    again = _cli([*args, "--retry-errors"], cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = again.communicate(timeout=300)
    assert again.returncode == 3, stdout
    assert "retry errors: 1 error records taken out" in stdout
    records = _records(out)
    assert Counter(r["custom_id"] for r in records) == Counter(line["custom_id"] for line in lines)  # still once each
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert (summary["batch"]["sent"], summary["batch"]["already_done"]) == (1, 12)


def test_sigkill_mid_batch_then_rerun_finishes_each_id_once(session_config, tmp_path: Path, cli_env, request):
    n = 600
    src = tmp_path / "big.jsonl"
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
    args = [
        "batch",
        str(src),
        "-o",
        str(out),
        "--runs-dir",
        str(session_config.runs_dir),
        "--model",
        str(session_config.model.path),
        "--concurrency",
        "2",
    ]
    first = _cli(args, cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_text().count("\n") >= 50):
        assert first.poll() is None, "the first run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done_before = out.read_text().count("\n")
    assert done_before < n, "the batch finished before the kill; make it longer"
    (killed_run,) = (tmp_path / "runs").iterdir()
    assert _wait_no_processes(str(tmp_path)) == [], "the killed run's server outlived it"

    second = _cli(args, cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = second.communicate(timeout=600)
    assert second.returncode == 0, stdout
    ids = Counter(r["custom_id"] for r in _records(out))
    assert len(ids) == n and set(ids.values()) == {1}
    assert {r["response"]["status_code"] for r in _records(out)} == {200}
    assert _wait_no_processes(str(tmp_path)) == []
    assert not (killed_run / "lease.json").exists() or not llama_processes(str(killed_run))
    row = fault_matrix.record(
        request.node.nodeid, "flow SIGKILLed then rerun", "local", folder=tmp_path, input_path=src, output_path=out,
        did=f"killed after {done_before} of {n} lines; the server stopped with its flow (parent watch); "
        "the rerun released the dead run's lease and sent only the rest",
        final_state="rerun: Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["leases_left"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_mid_batch_tears_down_and_exits_130(session_config, tmp_path: Path, cli_env, sig):
    src = tmp_path / "big.jsonl"
    with src.open("w") as f:
        for i in range(600):
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
    proc = _cli(
        [
            "batch",
            str(src),
            "-o",
            str(out),
            "--runs-dir",
            str(session_config.runs_dir),
            "--model",
            str(session_config.model.path),
            "--concurrency",
            "2",
        ],
        cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell that started us in the background may have set SIGINT to "ignore"
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_text().count("\n") >= 30):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout
    assert "tear down: stopped" in stdout and "interrupted" in stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "lease.json").exists()
    assert llama_processes(str(tmp_path)) == []  # gone by the time the CLI exits, no waiting
    assert out.read_text().count("\n") < 600


def test_the_flow_checks_its_input_before_any_server_starts(session_config: SessionConfig, tmp_path: Path):
    """A run from the UI or a schedule gets the same input check as the command line: a JSON
    array is refused by name, and no run folder (so no server) was made."""
    src = tmp_path / "requests.json"
    src.write_text(json.dumps([json.loads(SAMPLE_INPUT.read_text().splitlines()[0])]))
    with pytest.raises(ConfigError, match="a JSON array, not JSONL"):
        batch_inference(session=session_config, batch=BatchConfig(input_path=src, output_path=tmp_path / "o.jsonl"))
    assert not session_config.runs_dir.exists()


def test_an_openai_batch_file_runs_unchanged(session_config: SessionConfig, tmp_path: Path):
    """A file written for OpenAI's Batch API: a byte-order mark, max_completion_tokens (which
    llama-cpp-python ignores by itself: asked for 8, it gave 51), and one streamed line."""

    def line(cid: str, url: str, **body) -> str:
        prompt = {"messages": [{"role": "user", "content": "Say hi"}]} if "chat" in url else {"prompt": "Say hi"}
        return json.dumps(
            {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny-llama", **prompt, **body}}
        )

    src = tmp_path / "openai.jsonl"
    rows = [line(f"c{i}", "/v1/chat/completions", max_completion_tokens=8, temperature=1.0) for i in range(4)]
    rows += [line("p0", "/v1/completions", max_completion_tokens=8), line("s0", "/v1/completions", stream=True)]
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    out = tmp_path / "o.jsonl"
    batch_inference(session=session_config, batch=BatchConfig(input_path=src, output_path=out))
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"c0", "c1", "c2", "c3", "p0"}  # the first line too, despite the mark
    assert all(r["response"]["body"]["usage"]["completion_tokens"] <= 8 for r in records.values())
    errors = [json.loads(x) for x in out.with_name("o.errors.jsonl").read_text().splitlines()]
    assert [e.get("custom_id") for e in errors] == ["s0"] and "stream" in json.dumps(errors)


def _request(cid: str, url: str, body: dict) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def test_embeddings_lines_beside_chat_and_completions_of_one_model(session_config: SessionConfig, tmp_path: Path):
    """The input has /v1/embeddings lines, so the flow starts llama-cpp-python with --embedding True
    (the session asked for nothing); one server answers all three kinds. An embedding's usage has
    no completion_tokens: the output token count is the generations' alone."""
    assert session_config.engine.embeddings is False
    lines = []
    for i in range(4):
        lines += [
            _request(f"c{i}", "/v1/completions", {"model": "tiny-llama", "prompt": f"hi {i}", "max_tokens": 4}),
            _request(f"h{i}", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": f"hey {i}"}]}),
            _request(f"e{i}", "/v1/embeddings", {"model": "tiny-llama", "input": f"embed me {i}"}),
        ]  # fmt: skip
    lines.append(_request("l", "/v1/embeddings", {"model": "tiny-llama", "input": ["one", "two"]}))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=session_config, batch=BatchConfig(input_path=src, output_path=out, concurrency=3, fixed_output_tokens=4)
    )

    records = {r["custom_id"]: r for r in _records(out)}
    assert set(records) == {line["custom_id"] for line in lines}
    assert {r["response"]["status_code"] for r in records.values()} == {200}
    embeddings = [r["response"]["body"] for cid, r in records.items() if cid.startswith(("e", "l"))]
    assert all(b["object"] == "list" and b["data"][0]["embedding"] for b in embeddings)
    assert len(records["l"]["response"]["body"]["data"]) == 2  # one embedding per input
    assert all("completion_tokens" not in b["usage"] for b in embeddings)
    report = result.report
    assert (report.sent, report.succeeded, report.failed_http, report.invalid_lines) == (13, 13, 0, 0)
    assert report.completion_tokens == 8 * 4  # fixed output length on the 8 generations, none on embeddings
    assert report.prompt_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in records.values())
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["throughput"]["requests"] == 13 and summary["batch"]["completion_tokens"] == 32
    assert _wait_no_processes(str(tmp_path)) == []


def test_catalog_model_serves_lines_naming_another_model(session_config: SessionConfig, tmp_path: Path, cli_env):
    """`llmflow batch --catalog FILE --model tiny`: the lines name gpt-4o-mini, the catalog entry's
    session serves them, each sent under its served name (llama-cpp-python echoes the name it got)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    session = {
        "engine": {"venv": str(session_config.engine.venv)},
        "model": {"path": "../model/tiny.gguf", "served_name": "tiny-llama"},  # from the config file's folder
        "runs_dir": "../runs",
    }
    (configs / "tiny.json").write_text(json.dumps({"session": session}))
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models.tiny]\nconfig = "configs/tiny.json"\n[models.big]\nmodel_server_block = "nope"\n')
    src = tmp_path / "in.jsonl"
    lines = [
        _request(f"g{i}", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        for i in range(6)
    ]  # fmt: skip
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    proc = _cli(
        ["batch", str(src), "-o", str(out), "--catalog", str(catalog), "--model", "tiny"],
        cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    records = _records(out)
    assert sorted(r["custom_id"] for r in records) == [f"g{i}" for i in range(6)]
    assert {r["response"]["status_code"] for r in records} == {200}
    assert {r["response"]["body"]["model"] for r in records} == {"tiny-llama"}
    assert (tmp_path / "runs").is_dir() and _wait_no_processes(str(tmp_path)) == []


def test_the_deep_gate_of_a_batch_holds_the_engines_context_or_stops_before_any_line(session_config, tmp_path: Path):
    """ "auto" for a batch: the engine's n_ctx minus the fixed output, which a server started
    with that n_ctx holds; a size past it fails at the gate, and no line is sent."""
    from llmflow.config import GateConfig
    from llmflow.errors import GateFailed

    engine = session_config.engine.model_copy(update={"n_ctx": 256})
    out = tmp_path / "auto.jsonl"
    batch = BatchConfig(input_path=SAMPLE_INPUT, output_path=out, fixed_output_tokens=8)
    auto = session_config.model_copy(update={"engine": engine, "gate": GateConfig(deep_context="auto")})
    assert batch_inference(session=auto, batch=batch).report.succeeded == 240
    too_deep = auto.model_copy(update={"gate": GateConfig(deep_context=512)})
    with pytest.raises(GateFailed, match=r"deep gate \(gate.deep_context = 512\)"):
        batch_inference(session=too_deep, batch=batch.model_copy(update={"output_path": tmp_path / "deep.jsonl"}))
    assert not (tmp_path / "deep.jsonl").exists()
    assert _wait_no_processes(str(tmp_path)) == []

"""The deep gate: which prompt length it sends (the rule), and what a server that answers short
prompts but cannot hold a long one makes of the gate (a small real HTTP server in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from llmflow.config import (
    CommandEngine,
    EndpointPlacement,
    GateConfig,
    LlamaCppEngine,
    SessionConfig,
    VllmEngine,
)
from llmflow.errors import ConfigError, GateFailed
from llmflow.readiness import deep_check, deep_gate_size, wait_ready, with_deep_gate
from llmflow.results import ServerHandle


def _session(deep, engine=None) -> SessionConfig:
    return SessionConfig(
        placement=EndpointPlacement(base_url="http://127.0.0.1:1"),
        engine=engine or LlamaCppEngine(n_ctx=2048),
        gate=GateConfig(deep_context=deep),
    )


def test_the_deep_gate_is_off_unless_asked():
    assert GateConfig().deep_context is None
    assert deep_gate_size(_session(None), largest_context=4096) is None


def test_a_number_is_the_size_whatever_the_caller_knows():
    assert deep_gate_size(_session(512), largest_context=4096, output_tokens=64) == 512


def test_auto_is_a_campaign_s_largest_context():
    assert deep_gate_size(_session("auto"), largest_context=1024) == 1024
    session = with_deep_gate(_session("auto"), largest_context=1024)
    assert session.gate.deep_context == 1024 and deep_gate_size(session) == 1024
    assert with_deep_gate(_session(300), largest_context=1024).gate.deep_context == 300


def test_auto_elsewhere_is_the_engine_s_context_length_minus_the_output():
    assert deep_gate_size(_session("auto")) == 2047  # the gate's own one output token
    assert deep_gate_size(_session("auto"), output_tokens=64) == 1984  # a batch's fixed output length
    assert deep_gate_size(_session("auto", VllmEngine(max_model_len=512))) == 511


def test_auto_without_a_known_context_length_asks_for_a_size():
    for engine in (VllmEngine(), CommandEngine(argv=["srv", "{port}"])):
        with pytest.raises(ConfigError, match=r"gate.deep_context: 'auto'.*give the size"):
            deep_gate_size(_session("auto", engine))


def test_the_setting_takes_a_positive_size_or_auto():
    assert GateConfig(deep_context="auto").deep_context == "auto"
    for bad in (0, -5, "big"):
        with pytest.raises(ValidationError):
            GateConfig(deep_context=bad)


class _SmallContext(BaseHTTPRequestHandler):
    """llama-cpp-python-like: /v1/models, /extras/tokenize (one token per word, plus BOS) and
    completions that refuse a prompt past ``n_ctx`` with its 400."""

    n_ctx = 256
    truncate = False

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"data": [{"id": "m"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/extras/tokenize":
            return self._send(200, {"tokens": [0] * (1 + len(body["input"].split()))})
        if self.path != "/v1/completions":
            return self._send(404, {"detail": "Not Found"})
        n = 1 + len(body["prompt"].split())
        if self.truncate:
            n = min(n, self.n_ctx - 1)
        elif n + body.get("max_tokens", 16) > self.n_ctx:
            return self._send(400, {"error": f"Requested tokens ({n}) exceed context window of {self.n_ctx}"})
        self._send(200, {"choices": [{"text": "x"}], "usage": {"prompt_tokens": n, "completion_tokens": 1}})


@pytest.fixture
def small_server() -> Iterator[tuple[str, type[_SmallContext]]]:
    handler = type("Handler", (_SmallContext,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def _gate(url: str, deep: int | None, reports: list[str], tmp_path: Path):
    handle = ServerHandle(engine="llama_cpp", run_id="r", node="n", host="127.0.0.1", port=1, served_name="m")
    return wait_ready(
        url,
        handle,
        LlamaCppEngine(venv=tmp_path),
        deadline_s=5,
        interval_s=0.05,
        check_alive=lambda: None,
        report=reports.append,
        deep_context=deep,
    )


def test_a_server_that_cannot_hold_the_deep_context_fails_at_the_gate_naming_the_size(small_server, tmp_path):
    url, _ = small_server
    reports: list[str] = []
    with pytest.raises(GateFailed) as exc:
        _gate(url, 512, reports, tmp_path)
    message = str(exc.value)
    assert message.startswith("deep gate (gate.deep_context = 512): the server answers short prompts but not a ")
    assert "512-token prompt: HTTP 400" in message and "exceed context window of 256" in message


def test_a_server_that_holds_it_passes_and_says_so(small_server, tmp_path):
    url, _ = small_server
    reports: list[str] = []
    ready = _gate(url, 200, reports, tmp_path)
    assert ready.models == ["m"] and reports == ["deep gate: a 200-token prompt answered"]
    assert _gate(url, None, [], tmp_path).models == ["m"]  # no deep gate: the ping alone


def test_a_server_that_cuts_the_prompt_short_fails_the_deep_gate(small_server):
    url, handler = small_server
    handler.truncate = True
    with httpx.Client(base_url=url) as client, pytest.raises(GateFailed, match="cut a 512-token prompt to 255"):
        deep_check(client, "m", LlamaCppEngine(), 512, 5)


def test_a_server_without_a_tokenizer_refusing_the_measurement_fails_naming_the_size():
    """With no tokenize route the prompt is measured with completions: the server's 400 on the
    long one is the deep gate's failure, not a tool error."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/completions":
            return httpx.Response(404)
        n = 1 + len(json.loads(request.content)["prompt"].split())
        if n > 100:
            return httpx.Response(400, json={"error": "too long"})
        return httpx.Response(200, json={"usage": {"prompt_tokens": n}})

    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))
    with pytest.raises(GateFailed, match=r"= 300\): the server refused to measure a 300-token prompt: HTTP 400"):
        deep_check(client, "m", CommandEngine(argv=["srv", "{port}"]), 300, 5)

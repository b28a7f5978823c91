"""The readiness probe: its classification of one answer, and what the gate says while it waits."""

import socket
from pathlib import Path

import httpx
import pytest

from llmflow.config import LlamaCppEngine
from llmflow.readiness import (
    ServerLog,
    classify,
    gate_progress_line,
    last_log_line,
    transport_error_text,
    wait_ready,
)
from llmflow.results import ServerHandle


def test_gate_classification():
    assert classify(None) == "loading"
    assert classify(503) == "loading"
    assert classify(200) == "ready"
    assert classify(401) == "fatal"


def test_gate_progress_line_says_how_long_what_the_probe_saw_and_the_log():
    line = gate_progress_line(45.2, "/health", "503 Service Unavailable", "INFO loading weights")
    assert line == "not ready after 45s: GET /health: 503 Service Unavailable; server log: INFO loading weights"
    assert gate_progress_line(15, "/v1/models", "connection refused", None).endswith("; server log: (empty)")


def test_last_log_line_is_the_latest_frame_without_colours():
    assert last_log_line("a\nLoading 10%\rLoading 50%\r\n\n") == "Loading 50%"
    assert last_log_line("\x1b[32mINFO\x1b[0m ready\n") == "INFO ready"
    assert last_log_line("x" * 300, width=10) == "x" * 9 + "…"
    assert last_log_line("") is None and last_log_line(None) is None and last_log_line("\n \n") is None


def test_transport_errors_in_words():
    request = httpx.Request("GET", "http://127.0.0.1:1/")
    assert transport_error_text(httpx.ConnectError("[Errno 111] Connection refused", request=request)) == (
        "connection refused"
    )
    assert transport_error_text(httpx.ReadTimeout("timed out", request=request)) == "no answer in time"
    assert transport_error_text(httpx.RemoteProtocolError("Server disconnected", request=request)) == (
        "connection closed without an answer"
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gate_reports_progress_and_its_timeout_names_the_log(tmp_path: Path):
    """A loading server was silent for a minute; the gate now reports (one log read per report)
    and the error that ends it names the log file as well as its tail."""
    reads: list[int] = []

    def tail(lines: int) -> str:
        reads.append(lines)
        return "llama_model_load: loading 10%\rllama_model_load: loading 60%\n"

    handle = ServerHandle(engine="llama_cpp", run_id="r", node="n", host="127.0.0.1", port=1, served_name="m")
    reports: list[str] = []
    with pytest.raises(TimeoutError) as exc:
        wait_ready(
            f"http://127.0.0.1:{_closed_port()}",
            handle,
            LlamaCppEngine(venv=tmp_path),
            deadline_s=0.6,
            interval_s=0.02,
            check_alive=lambda: None,
            log=ServerLog("della:/scratch/r/server.log", tail),
            report=reports.append,
            report_every_s=0.2,
        )
    assert 1 <= len(reports) <= 3 and len(reads) == len(reports) + 1  # one read per report, one for the error
    assert reports[0].startswith("not ready after 0s: GET /v1/models: connection refused; server log: ")
    assert reports[0].endswith("llama_model_load: loading 60%")
    assert "last: connection refused" in str(exc.value)
    assert "log tail (della:/scratch/r/server.log):\nllama_model_load: loading 10%" in str(exc.value)


class _Router:
    """A router as the gate sees it: /health 200 at once, /v1/models its list; POSTs counted."""

    def __init__(self, models: list[str]) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[str] = []
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = b'{"status":"ok"}'
                if self.path == "/v1/models":
                    data = [{"id": m, "status": {"value": "unloaded"}} for m in models]
                    body = json.dumps({"data": data, "object": "list"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                router.posts.append(self.path)
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gate(self) -> object:
        from llmflow.config import LlamaRouter, LlamaServerEngine

        handle = ServerHandle(engine="llama_server", run_id="r", node="n", host="127.0.0.1", port=1, served_name="m")
        engine = LlamaServerEngine(router=LlamaRouter(models_max=1))
        try:
            return wait_ready(self.url, handle, engine, deadline_s=5, interval_s=0.05, check_alive=lambda: None)
        finally:
            self.server.shutdown()


def test_a_router_is_ready_when_it_answers_and_lists_models_and_loads_none():
    """No test completion: served_name names no model of the router, and a completion would load one."""
    router = _Router(["alpha", "beta"])
    ready = router.gate()
    assert ready.models == ["alpha", "beta"] and router.posts == []


def test_a_router_with_no_model_to_serve_fails_the_gate():
    from llmflow.errors import GateFailed

    with pytest.raises(GateFailed, match="the router lists no models: model.path"):
        _Router([]).gate()

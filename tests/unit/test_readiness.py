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

"""The endpoint placement against a real server that another session holds."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prefect import flow
from pydantic import SecretStr

from flows.batch import batch_inference
from flows.session import model_session
from llmflow.config import SAMPLE_INPUT, BatchConfig, EndpointPlacement, SessionConfig
from tests.integration.test_batch_flow import _records, _wait_no_processes

pytestmark = pytest.mark.integration


def test_endpoint_placement_uses_a_running_server_and_leaves_it_running(session_config, tmp_path: Path):
    """Someone else's server (here: one our own local session holds) is gated and used, never stopped."""

    @flow
    def outer() -> tuple[int, int, bool]:
        with model_session(session_config) as s:
            theirs = SessionConfig(
                placement=EndpointPlacement(base_url=s.tunnel.base_url, api_key=SecretStr(s.handle.api_key())),
                runs_dir=tmp_path / "endpoint-runs",
            )
            out = tmp_path / "out.jsonl"
            result = batch_inference(session=theirs, batch=BatchConfig(output_path=out, concurrency=4))
            still_up = httpx.get(s.tunnel.base_url + "/v1/models", headers=s.handle.auth_headers()).status_code == 200
            return result.report.succeeded, len(_records(out)), still_up

    succeeded, lines, still_up = outer()
    n = sum(1 for line in SAMPLE_INPUT.read_text().splitlines() if line.strip())
    assert succeeded == lines == n
    assert still_up, "the endpoint placement stopped a server it did not start"
    assert _wait_no_processes(str(tmp_path)) == []  # the session that did start it tore it down

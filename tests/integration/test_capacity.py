"""Capacity search against real servers: llama-cpp-python (one request at a time, so a high
concurrency waits past the request timeout) and vLLM (one server start, small cells).

Each test runs the ``benchmark-campaign`` flow with ``campaign.capacity`` and checks the
capacity table in summary.json, capacity.csv, capacity.png, the report and the artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.campaign import benchmark_campaign
from llmflow.bench.capacity_report import capacity_markdown
from llmflow.bench.config import CampaignConfig
from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig
from tests.conftest import llama_processes
from tests.integration.conftest import tiny_vllm_session
from tests.integration.test_campaign import _artifacts

pytestmark = pytest.mark.integration


def _check_capacity(out: Path, result, name: str, state) -> list[dict]:
    """The capacity table is in summary.json, capacity.csv and the artifacts; the plot is a PNG
    with one row per context; every cell the search ran is an ordinary recorded cell."""
    summary = json.loads((out / "summary.json").read_text())
    table = summary["capacity"]
    csv = pd.read_csv(out / "capacity.csv")
    assert len(csv) == len(table) and csv["context"].tolist() == [r["context"] for r in table]
    assert (out / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(r["cells"] for r in table) == len(result.cells) == len(summary["cells"])
    assert len((out / "cells.jsonl").read_text().splitlines()) == len(result.cells)
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert json.loads(artifacts[f"campaign-capacity-{name}"].data) == table
    assert "## Capacity" in artifacts[f"campaign-{name}-report"].data
    print(f"\n{name}:\n" + capacity_markdown(table))  # the table, for the record (pytest -s)
    return table


def test_llama_cpp_capacity_search_finds_the_concurrency_past_the_timeout(server_env, prefect_api_url, tmp_path: Path):
    """llama-cpp-python answers one request at a time: at concurrency c a request waits for the
    c-1 before it, so past some c the wait exceeds request_timeout_s (timed_out); a context past
    n_ctx is rejected at the first load."""
    venv, model = server_env
    campaign = CampaignConfig(
        name="it-capacity-llama",
        context_sizes=[32, 128, 256, 1024],
        output_tokens=[128],
        rounds=2,
        request_timeout_s=1.0,
        capacity={"dimension": "concurrency", "start": 1, "factor": 2, "max": 32, "bisect_steps": 3},
        output_dir=tmp_path / "out",
        compare_to_last=False,
    )
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=512), model=ModelConfig(path=model), runs_dir=tmp_path / "runs"
    )
    state = benchmark_campaign(session=session, campaign=campaign, return_state=True)
    result = state.result()
    table = _check_capacity(tmp_path / "out", result, "it-capacity-llama", state)
    rows = {r["context"]: r for r in table}
    assert rows[1024]["held"] is None and rows[1024]["failed"] == 1 and rows[1024]["verdict"] == "rejected"
    assert rows[1024]["cells"] == 1
    for ctx in (32, 128, 256):
        row = rows[ctx]
        assert row["done"] and row["held"] is not None and row["held"] >= 1, row
        assert row["verdict"] == "timed_out" and row["failed"] > row["held"], row  # 32 in flight: waits >> 1 s
        assert row["cells"] <= 6 + 3
    ran = sum(r["cells"] for r in table)
    assert ran < table[0]["grid_cells"] * len(table)
    # every request of a held cell was ok and as long as asked: ordinary cells
    for cell in result.cells:
        if cell.status == "ok":
            assert cell.summary.completed == cell.requests == cell.concurrency * 2
    assert result.sessions == 1
    assert not llama_processes(str(tmp_path / "runs"))


def test_vllm_capacity_search_on_one_server(vllm_env, prefect_api_url, tmp_path: Path):
    """One vLLM start; small cells: the contexts within max_model_len hold up to the max, the
    one past it is rejected at the first load."""
    venv, model = vllm_env
    campaign = CampaignConfig(
        name="it-capacity-vllm",
        context_sizes=[64, 256, 1024],
        output_tokens=[8],
        rounds=1,
        capacity={"start": 1, "factor": 2, "max": 4, "bisect_steps": 2},
        output_dir=tmp_path / "out",
        compare_to_last=False,
    )
    session = tiny_vllm_session(venv, model, tmp_path / "runs")
    state = benchmark_campaign(session=session, campaign=campaign, return_state=True)
    result = state.result()
    assert result.sessions == 1
    table = _check_capacity(tmp_path / "out", result, "it-capacity-vllm", state)
    rows = {r["context"]: r for r in table}
    for ctx in (64, 256):
        assert (rows[ctx]["held"], rows[ctx]["failed"], rows[ctx]["at_max"], rows[ctx]["cells"]) == (4, None, True, 3)
    assert (rows[1024]["held"], rows[1024]["failed"], rows[1024]["verdict"]) == (None, 1, "rejected")
    assert sum(r["cells"] for r in table) == 7 and table[0]["grid_cells"] * 3 == 9
    assert not llama_processes(str(tmp_path / "runs"))

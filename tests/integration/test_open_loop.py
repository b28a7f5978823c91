"""Open-loop campaigns against real servers: cells at three request rates, every request's
scheduled time, send delay, TTFT and E2EL in the request table, a rate far above capacity
stopped early as ``saturated``, and the warm-up finished before any timed request is sent.

vLLM (CPU) starts once for its test, with small cells; llama-cpp-python is the fast one to
iterate on. Measured figures are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.campaign import benchmark_campaign
from llmflow.bench.config import CampaignConfig
from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig
from llmflow.results import CellResult
from tests.conftest import llama_processes
from tests.integration.conftest import tiny_vllm_session

pytestmark = pytest.mark.integration

# The rule the tests stop a cell by: the backlog grew over 4 windows of half a second (2 s),
# well inside a schedule of OPEN_LOOP_S.
SATURATION = {"window_s": 0.5, "windows": 4, "min_backlog": 16}
OPEN_LOOP_S = 4.0


def _check_open_loop(out: Path, cells: list[CellResult], low_rates: list[float], flood: float) -> pd.DataFrame:
    rows = pd.read_parquet(out / "requests.parquet")
    assert [c.rate for c in cells] == [*low_rates, flood]
    for cell in cells:
        timed = rows[(rows["cell"] == cell.key) & (~rows["warmup"])]
        scheduled = round(cell.rate * OPEN_LOOP_S)
        assert len(timed) == scheduled  # every scheduled request has a row, cancelled ones too
        assert timed["scheduled_s"].notna().all() and timed["send_delay_s"].notna().all()
        sent = timed[timed["start_s"].notna()]
        assert (sent["start_s"] >= sent["scheduled_s"] - 1e-6).all()
        assert ((sent["start_s"] - sent["scheduled_s"]) - sent["send_delay_s"]).abs().max() < 1e-6
        ok = timed[timed["outcome"] == "ok"]
        assert ok["ttft_s"].notna().all() and ok["e2el_s"].notna().all()
        assert (ok["ttft_s"] >= ok["send_delay_s"]).all()  # counted from the scheduled time
        # the warm-up ended before the first timed request was sent
        warm = rows[(rows["cell"] == cell.key) & rows["warmup"]]
        assert len(warm) == 2 and (warm["outcome"] == "ok").all()
        assert warm["ended_at"].max() <= sent["sent_at"].min()
        f = cell.summary.model_dump()
        print(
            f"{cell.key}: {cell.status}, {f['completed']}/{scheduled} ok, {f['cancelled']} cancelled, "
            f"duration {f['duration']:.2f} s (schedule {OPEN_LOOP_S} s), send delay mean/p99 "
            f"{f['mean_send_delay_ms']}/{f['p99_send_delay_ms']} ms, TTFT mean/p99 {f['mean_ttft_ms']}/"
            f"{f['p99_ttft_ms']} ms, E2EL mean/p99 {f['mean_e2el_ms']}/{f['p99_e2el_ms']} ms, "
            f"goodput {f['request_goodput']} req/s, slo_met {f['slo_met']}; {cell.reason or ''}"
        )
    for cell in cells[:-1]:
        assert cell.status == "ok", (cell.key, cell.status, cell.reason)
        assert cell.summary.cancelled == 0 and cell.summary.completed == round(cell.rate * OPEN_LOOP_S)
        assert cell.summary.request_goodput is not None and cell.summary.slo_met is not None
    flooded = cells[-1]
    assert flooded.status == "saturated", (flooded.key, flooded.status, flooded.reason)
    assert "backlog" in flooded.reason
    # stopped early: without the stop this cell ran 10 s and more here (its 240 requests all
    # answered); the stop fires within the 4 s schedule, closing what is in flight takes a moment
    # more on a loaded machine (up to 5 s seen)
    assert flooded.summary.duration < 1.5 * OPEN_LOOP_S
    assert flooded.summary.cancelled > flooded.summary.completed
    table = pd.read_csv(out / "cells.csv")
    assert list(table["status"])[: len(cells)] == ["ok"] * len(low_rates) + ["saturated"]
    assert {"rate", "p99_send_delay_ms", "request_goodput", "slo_met"} <= set(table.columns)
    return rows


def _campaign(name: str, out: Path, rates: list[float], context: int, output: int) -> CampaignConfig:
    return CampaignConfig(
        name=name,
        context_sizes=[context],
        concurrencies=[256],  # the in-flight cap: high enough never to bind below saturation
        output_tokens=[output],
        rates=rates,
        open_loop_s=OPEN_LOOP_S,
        warmup_requests=2,
        saturation=SATURATION,
        slo={"ttft_ms": 2000, "e2el_ms": 5000},
        request_timeout_s=60,
        output_dir=out,
    )


def test_llama_cpp_open_loop_rates_and_a_saturated_cell(server_env, prefect_api_url, tmp_path: Path):
    venv, model = server_env
    rates = [0.5, 1.0, 2.0]
    flood = 50.0  # llama-cpp-python answers one request at a time
    campaign = _campaign("it-open-llama", tmp_path / "out", [*rates, flood, 2 * flood], context=32, output=64)
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256), model=ModelConfig(path=model), runs_dir=tmp_path / "runs"
    )
    result = benchmark_campaign(session=session, campaign=campaign)
    *cells, higher = result.cells  # a rate above a saturated one is not run
    assert (higher.rate, higher.status, higher.reason) == (2 * flood, "skipped", f"rate {flood:g}/s was saturated")
    _check_open_loop(tmp_path / "out", cells, rates, flood)
    assert not llama_processes(str(tmp_path / "runs"))


def test_vllm_open_loop_rates_and_a_saturated_cell(vllm_env, prefect_api_url, tmp_path: Path):
    venv, model = vllm_env
    rates = [1.0, 2.0, 4.0]
    # far above what vLLM on two shared CPU cores answers: it batches, and answered 100/s of
    # 64-token prompts and 8-token outputs, but 4/s of 256 + 128 tokens already wait
    flood = 60.0
    campaign = _campaign("it-open-vllm", tmp_path / "out", [*rates, flood], context=256, output=128)
    session = tiny_vllm_session(venv, model, tmp_path / "runs")
    result = benchmark_campaign(session=session, campaign=campaign)
    rows = _check_open_loop(tmp_path / "out", result.cells, rates, flood)
    assert set(rows[rows["outcome"] == "ok"]["usage_source"]) == {"server"}

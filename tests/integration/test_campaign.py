"""Stress-test campaigns against real servers: llama-cpp-python (fast to start) and vLLM.

Each test runs the ``benchmark-campaign`` flow in-process against the session's Prefect
server and checks the files, the artifacts and the verdicts the issue asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.campaign import benchmark_campaign
from llmflow.bench.config import CampaignConfig
from llmflow.bench.report import output_names
from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig
from tests.conftest import kill_server_during_cell, llama_processes
from tests.integration.conftest import tiny_vllm_session

pytestmark = pytest.mark.integration


def _artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def _check_outputs(out: Path, cells: list, ok_contexts: list[int], past_limit: int) -> pd.DataFrame:
    """The files exist; every ok cell's completions are exactly as long as asked; the cell past
    the context limit is rejected (and did not stop the cells after it)."""
    for name in ("requests.parquet", "summary.json", "cells.csv", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output_names(out) == ["summary.json", "cells.csv", "requests.parquet", "plot.png", "vllm/"]
    table = pd.read_csv(out / "cells.csv", dtype=str)
    assert table["completed"].dropna().str.fullmatch(r"\d+").all()  # 4, not 4.0, beside skipped cells
    rows = pd.read_parquet(out / "requests.parquet")
    for cell in cells:
        if cell.context in ok_contexts:
            assert cell.status == "ok", (cell.key, cell.status, cell.reason)
            timed = rows[(rows["cell"] == cell.key) & (~rows["warmup"])]
            assert len(timed) == cell.requests == cell.concurrency * 2
            assert (timed["completion_tokens"] == cell.output_tokens).all()
            assert (timed["prompt_tokens"] == cell.context).all()  # exact prompt lengths
            assert cell.summary.prefill_tok_per_s > 0 and cell.summary.decode_tok_per_s > 0
            assert cell.summary.mean_ttft_ms > 0 and cell.summary.p99_itl_ms is not None
            vllm = json.loads((out / "vllm" / f"{cell.key}.json").read_text())
            assert vllm["completed"] == cell.requests and vllm["max_concurrency"] == cell.concurrency
            assert vllm["output_lens"] == [cell.output_tokens] * cell.requests and len(vllm["ttfts"]) == cell.requests
        elif cell.context == past_limit:
            assert cell.status == "rejected", (cell.key, cell.status, cell.reason)
            assert "400" in cell.reason
    # the rejected cell of the first concurrency did not end the campaign: the next concurrency ran
    assert [c.status for c in cells].count("ok") == len(ok_contexts) * 2
    assert [c.status for c in cells].count("rejected") == 2
    return rows


def test_llama_cpp_campaign_table_plot_artifacts_rejected_cell_and_baseline(
    server_env, prefect_api_url, tmp_path: Path
):
    venv, model = server_env
    contexts = [32, 64, 128, 240]
    # a baseline no real run can match: every ok cell must be flagged as a regression
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "cells": [
                    {"key": f"ctx{c}-c{k}-out8", "status": "ok", "output_throughput": 1e9}
                    for c in contexts
                    for k in (1, 2)
                ]
            }
        )
    )
    campaign = CampaignConfig(
        name="it-llama-cpp",
        context_sizes=[*contexts, 512, 1024],
        concurrencies=[1, 2],
        output_tokens=[8],
        rounds=2,
        output_dir=tmp_path / "out",
        baseline=baseline,
    )
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256), model=ModelConfig(path=model), runs_dir=tmp_path / "runs"
    )
    state = benchmark_campaign(session=session, campaign=campaign, return_state=True)
    result = state.result()
    assert result.sessions == 1
    rows = _check_outputs(tmp_path / "out", result.cells, contexts, 512)
    assert set(rows["usage_source"].dropna()) == {"chunks"}  # llama-cpp-python streams no usage
    assert {r["key"] for r in result.regressions} == {f"ctx{c}-c{k}-out8" for c in contexts for k in (1, 2)}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["cells"]) == 12 and summary["regressions"]
    skipped = [c for c in result.cells if c.context == 1024]
    assert [c.status for c in skipped] == ["skipped", "skipped"] and skipped[0].reason == "context 512 was rejected"
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert {"campaign-it-llama-cpp", "campaign-it-llama-cpp-report"} <= set(artifacts)
    table = json.loads(artifacts["campaign-it-llama-cpp"].data)
    assert [r["status"] for r in table].count("rejected") == 2
    assert "Regressions against the baseline" in artifacts["campaign-it-llama-cpp-report"].data
    assert not llama_processes(str(tmp_path / "runs"))


def test_killed_server_is_crashed_and_the_campaign_goes_on_with_a_new_one(server_env, prefect_api_url, tmp_path: Path):
    """SIGKILL the server once the second cell has finished its first request: that cell is
    crashed, a new server is started, and every later cell runs ok."""
    venv, model = server_env
    out, runs = tmp_path / "out", tmp_path / "runs"
    campaign = CampaignConfig(
        name="it-crash",
        context_sizes=[32, 64, 128],
        concurrencies=[1],
        output_tokens=[128],
        rounds=40,
        warmup_requests=0,
        output_dir=out,
    )
    session = SessionConfig(engine=LlamaCppEngine(venv=venv, n_ctx=512), model=ModelConfig(path=model), runs_dir=runs)
    killer, killed = kill_server_during_cell(out / "requests.jsonl", "ctx64-c1-out128", runs, timeout_s=300)
    result = benchmark_campaign(session=session, campaign=campaign)
    killer.join(5)
    assert len(killed) == 1
    status = {c.key: c for c in result.cells}
    assert status["ctx32-c1-out128"].status == "ok"
    crashed = status["ctx64-c1-out128"]
    assert crashed.status == "crashed" and crashed.summary.crashed > 0 and crashed.session == 1
    assert status["ctx128-c1-out128"].status == "ok" and status["ctx128-c1-out128"].session == 2
    assert result.sessions == 2
    rows = pd.read_parquet(out / "requests.parquet")
    assert set(rows[rows["cell"] == "ctx64-c1-out128"]["outcome"]) == {"ok", "crashed"}
    assert not llama_processes(str(runs))


def test_vllm_campaign_server_figures_beside_the_client(vllm_env, prefect_api_url, tmp_path: Path):
    venv, model = vllm_env
    contexts = [64, 128, 256, 496]
    campaign = CampaignConfig(
        name="it-vllm",
        context_sizes=[*contexts, 1024],
        concurrencies=[1, 2],
        output_tokens=[16],
        rounds=2,
        output_dir=tmp_path / "out",
    )
    session = tiny_vllm_session(venv, model, tmp_path / "runs")
    result = benchmark_campaign(session=session, campaign=campaign)
    rows = _check_outputs(tmp_path / "out", result.cells, contexts, 1024)
    assert set(rows[rows["outcome"] == "ok"]["usage_source"]) == {"server"}  # stream_options.include_usage
    for cell in result.cells:
        if cell.status == "ok":
            # vLLM's own counters over the cell agree with the client's usage sums
            assert cell.server.server_prompt_tokens == cell.summary.total_input_tokens
            assert cell.server.server_generation_tokens == cell.summary.total_output_tokens
            assert cell.server.server_prefill_tok_per_s > 0 and cell.server.server_decode_tok_per_s > 0
            assert cell.peak_rss_mib > 100  # the vLLM process group, API server and engine core
    assert not llama_processes(str(tmp_path / "runs"))


def test_a_stopped_campaign_resumes_where_it_stopped(server_env, prefect_api_url, tmp_path: Path):
    """cells.jsonl is written cell by cell: a rerun with resume keeps the finished cells and
    their request rows, drops the rows of the cell that was cut off, and runs only the rest."""
    venv, model = server_env
    out = tmp_path / "out"
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256), model=ModelConfig(path=model), runs_dir=tmp_path / "runs"
    )
    campaign = CampaignConfig(
        name="it-resume", context_sizes=[32, 64, 128], concurrencies=[1], output_tokens=[4], output_dir=out
    )
    first = benchmark_campaign(session=session, campaign=campaign)
    assert [c.status for c in first.cells] == ["ok"] * 3
    # as if the run had been killed during the third cell: its record never written, a torn line
    lines = (out / "cells.jsonl").read_text().splitlines()
    (out / "cells.jsonl").write_text("\n".join(lines[:2]) + '\n{"key": "ctx128-c1')
    with pytest.raises(FileExistsError, match="resume"):
        benchmark_campaign(session=session, campaign=campaign)
    again = benchmark_campaign(session=session, campaign=campaign.model_copy(update={"resume": True}))
    assert [c.session for c in again.cells] == [1, 1, 2]
    assert again.cells[0].summary == first.cells[0].summary
    rows = pd.read_parquet(out / "requests.parquet")
    assert rows.groupby("cell").size().to_dict() == {
        "ctx32-c1-out4": 3,
        "ctx64-c1-out4": 3,
        "ctx128-c1-out4": 3,
    }  # warm-up + 2
    assert len((out / "cells.jsonl").read_text().splitlines()) == 3


def test_server_cpus_keep_the_orchestrator_off_the_servers_cpu_while_a_campaign_runs(
    server_env, prefect_api_url, tmp_path: Path
):
    """``server_cpus=[1]``: the supervisor and the server run on CPU 1 only, the orchestrator
    (this process, every thread) on CPU 0 while the session lasts and back on all after; the
    cell reports the client's own CPU."""
    import os
    import threading

    from llmflow.config import LocalPlacement
    from llmflow.placements.cpus import allowed_cpus

    before = os.sched_getaffinity(0)
    if not {0, 1} <= before:
        pytest.skip("needs CPUs 0 and 1")
    venv, model = server_env
    runs, out = tmp_path / "runs", tmp_path / "out"
    seen: dict[str, list] = {"server": [], "orchestrator": []}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            for endpoint in runs.glob("*/endpoint.json"):
                try:
                    ep = json.loads(endpoint.read_text())
                    seen["server"].append((allowed_cpus(ep["pid"]), allowed_cpus(ep["server_pid"])))
                except (OSError, ValueError, KeyError):
                    continue
                tasks = Path("/proc/self/task").iterdir()
                seen["orchestrator"].append({frozenset(allowed_cpus(int(t.name))) for t in tasks})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256),
        model=ModelConfig(path=model),
        runs_dir=runs,
        placement=LocalPlacement(server_cpus=[1]),
    )
    campaign = CampaignConfig(
        name="it-cpus", context_sizes=[64], concurrencies=[2], output_tokens=[32], rounds=4, output_dir=out
    )
    try:
        result = benchmark_campaign(session=session, campaign=campaign)
    finally:
        done.set()
        watcher.join(5)
    (cell,) = result.cells
    assert cell.status == "ok", cell.reason
    assert seen["server"] and all(s == ({1}, {1}) for s in seen["server"])
    assert {frozenset({0})} in seen["orchestrator"]  # every thread off CPU 1 during the session
    assert os.sched_getaffinity(0) == before == allowed_cpus(os.getpid())  # restored at teardown
    assert cell.summary.client_cpu_s > 0 and 0 < cell.summary.client_cpu_share <= 1  # one CPU left to it
    table = pd.read_csv(out / "cells.csv")
    assert table["client_cpu_share"].iloc[0] == pytest.approx(
        cell.summary.client_cpu_share, abs=5e-4
    )  # cells.csv: 3 decimals
    print(
        f"client CPU share {cell.summary.client_cpu_share:.3f} ({cell.summary.client_cpu_s:.3f} s "
        f"over {cell.summary.duration:.3f} s), {cell.summary.output_throughput:.1f} output tok/s"
    )
    assert not llama_processes(str(runs))

"""A campaign over two models of one llama-server router tier (``campaign.models``), against the
real binary, one model loaded at a time so every cell begins with a swap."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.campaign import benchmark_campaign
from llmflow.bench.config import CampaignConfig
from llmflow.tiny_model import write_tiny_llama
from tests.conftest import llama_processes
from tests.integration.test_campaign import _artifacts
from tests.integration.test_router import router_session

pytestmark = pytest.mark.integration

MODELS = ("alpha", "beta")


def test_campaign_over_two_router_models_writes_a_survival_table_and_swap_cost_per_model(
    llama_server_bin, tmp_path: Path, prefect_api_url
):
    """alpha and beta in turn at each cell, ``models_max`` 1: every cell is measured against the
    model it names; each model gets its survival table (a file, summary.json and the report) and
    its tok/s; the context past n_ctx is rejected for both; each cell began with its model
    unloaded, so each is a swap sample, and a swap costs more than a warm first token."""
    models = tmp_path / "models"
    for seed, name in enumerate(MODELS, start=1):
        write_tiny_llama(models / f"{name}.gguf", seed=seed)
    out = tmp_path / "out"
    campaign = CampaignConfig(
        name="it-router-models",
        models=list(MODELS),
        context_sizes=[32, 64, 600],  # 600 > n_ctx 512: rejected
        concurrencies=[1, 2],
        output_tokens=[4],
        rounds=2,
        output_dir=out,
        compare_to_last=False,
    )
    session = router_session(llama_server_bin, models, tmp_path / "runs", models_max=1)
    state = benchmark_campaign(session=session, campaign=campaign, return_state=True)
    result = state.result()

    assert result.sessions == 1 and len(result.cells) == 12
    assert [c.model for c in result.cells] == list(MODELS) * 6
    assert result.cells[0].key == "malpha-ctx32-c1-out4" and result.cells[1].key == "mbeta-ctx32-c1-out4"
    for c in result.cells:
        want = "rejected" if c.context == 600 else "ok"
        assert c.status == want, (c.key, c.status, c.reason)
        assert c.model_state == "unloaded", c.key  # the other model was loaded before each cell
        assert c.swap_ttft_ms is not None and c.warm_ttft_ms is not None, c.key
    rows = pd.read_parquet(out / "requests.parquet")
    timed = rows[~rows["warmup"]]
    assert set(timed["model"]) == set(MODELS)
    assert (timed["cell"].str.extract(r"^m(\w+?)-ctx")[0] == timed["model"]).all()
    assert (timed[timed["outcome"] == "ok"]["completion_tokens"] == 4).all()

    # one survival table per model: a file, an entry in summary.json, a section of the report
    assert sorted(p.name for p in (out / "survival").iterdir()) == ["alpha.csv", "beta.csv"]
    for name in MODELS:
        table = pd.read_csv(out / "survival" / f"{name}.csv")
        assert list(table.columns) == ["context", "c1-out4", "c2-out4"]
        assert table["context"].tolist() == [32, 64, 600]
        assert table.set_index("context").loc[600].tolist() == ["rejected", "rejected"]
        assert (table.set_index("context").loc[[32, 64]] == "ok").all().all()
    summary = json.loads((out / "summary.json").read_text())
    by_model = {m["model"]: m for m in summary["models"]}
    assert set(by_model) == set(MODELS)
    for name in MODELS:
        figures = by_model[name]
        assert figures["survival"] == {"ok": 4, "rejected": 2, "crashed": 0, "timed_out": 0}
        assert figures["output_tok_per_s"] > 0 and figures["decode_tok_per_s"] > 0
        assert len(figures["survival_table"]) == 3
        assert figures["swap"]["samples"] == 6 and figures["swap"]["swap_ttft_ms"] > 0
    swap = summary["swap_cost"]
    assert swap["samples"] == 12 and swap["swap_ttft_ms"] > swap["warm_ttft_ms"] > 0 and swap["cost_ms"] > 0
    report = _artifacts(state.state_details.flow_run_id)["campaign-it-router-models-report"].data
    assert "## Survival: alpha" in report and "## Survival: beta" in report and "## Model swap cost" in report
    print(  # the measured figures, for the record (pytest -s)
        f"\nswap cost: {swap['samples']} samples, swap TTFT median {swap['swap_ttft_ms']} ms, "
        f"warm {swap['warm_ttft_ms']} ms, cost {swap['cost_ms']} ms, slowest {swap['max_swap_ttft_ms']} ms; "
        + "; ".join(f"{m}: {by_model[m]['output_tok_per_s']} output tok/s" for m in MODELS)
    )
    assert llama_processes(str(tmp_path)) == []

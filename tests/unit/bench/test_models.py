"""A campaign over a router tier's models (``campaign.models``) without a server: the grid and
its keys, the checks against the session, the per-model report and the swap figure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from llmflow.bench.config import CampaignConfig, Cell, cell_result, check_models, grid, skip_reason
from llmflow.bench.model_report import (
    model_figures,
    models_markdown,
    models_summary,
    survival_counts,
    survival_table,
    swap_cost,
    write_survival_tables,
)
from llmflow.bench.prompts import known_routes
from llmflow.bench.report import campaign_figure, cells_frame, cells_table, vllm_result
from llmflow.bench.swap import model_state
from llmflow.config import LlamaCppEngine, LlamaRouter, LlamaServerEngine, ModelConfig, SessionConfig
from llmflow.errors import ConfigError
from llmflow.results import CellResult


def _cell(model: str | None, context: int, status: str = "ok", **fields) -> CellResult:
    summary = (
        {"duration": 2.0, "total_output_tokens": 40, "prefill_tok_per_s": 1000.0, "decode_tok_per_s": 50.0}
        if status == "ok"
        else {}
    )
    return cell_result(
        Cell(context=context, concurrency=fields.pop("concurrency", 1), output_tokens=4, model=model),
        status,
        summary=summary,
        **fields,
    )


def test_models_run_each_cell_in_turn_under_their_own_keys():
    c = CampaignConfig(models=["alpha", "beta"], context_sizes=[64, 32], concurrencies=[1], output_tokens=[4])
    assert [cell.key for cell in grid(c)] == [
        "malpha-ctx32-c1-out4",
        "mbeta-ctx32-c1-out4",
        "malpha-ctx64-c1-out4",
        "mbeta-ctx64-c1-out4",
    ]
    assert [cell.key for cell in grid(c.model_copy(update={"models": None}))] == ["ctx32-c1-out4", "ctx64-c1-out4"]
    assert cell_result(grid(c)[1], "ok").model == "beta"


def test_a_rejection_skips_larger_contexts_of_that_model_only():
    rejected = _cell("alpha", 32, "rejected")
    assert skip_reason(Cell(context=64, concurrency=1, output_tokens=4, model="alpha"), [rejected], ["rejected"])
    assert skip_reason(Cell(context=64, concurrency=1, output_tokens=4, model="beta"), [rejected], ["rejected"]) is None


@pytest.mark.parametrize(
    ("models", "words"),
    [([], "at least one"), (["a", "a"], "distinct"), (["a", " "], "none empty")],
)
def test_models_are_checked_with_the_field_named(models, words):
    with pytest.raises(ValidationError, match=f"models[\\s\\S]*{words}"):
        CampaignConfig(models=models)


def test_models_and_a_capacity_search_are_refused_together():
    with pytest.raises(ValidationError, match="capacity"):
        CampaignConfig(models=["a"], capacity={"dimension": "concurrency", "start": 1, "max": 4})


def test_models_need_a_router_that_has_them(tmp_path: Path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").write_bytes(b"GGUF")
    router = SessionConfig(
        engine=LlamaServerEngine(router=LlamaRouter(models_max=1)), model=ModelConfig(path=folder), runs_dir=tmp_path
    )
    check_models(CampaignConfig(models=["alpha", "beta"]), router)
    check_models(CampaignConfig(), router)
    with pytest.raises(ConfigError, match=r"campaign.models: gamma not in .*serves alpha, beta"):
        check_models(CampaignConfig(models=["alpha", "gamma"]), router)
    single = SessionConfig(engine=LlamaCppEngine(), model=ModelConfig(path=folder / "alpha.gguf"), runs_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"campaign.models: alpha need a llama-server router.*llama_cpp"):
        check_models(CampaignConfig(models=["alpha"]), single)
    check_models(CampaignConfig(), single)


def test_model_state_reads_the_router_list():
    payload = {
        "data": [{"id": "alpha", "status": {"value": "loaded"}}, {"id": "beta", "status": {"value": "unloaded"}}]
    }
    assert (model_state(payload, "alpha"), model_state(payload, "beta"), model_state(payload, "x")) == (
        "loaded",
        "unloaded",
        None,
    )


def test_a_router_tokenize_request_names_the_model():
    router, single = LlamaServerEngine(router=LlamaRouter()), LlamaServerEngine()
    assert known_routes(router)[0]("hi", "alpha") == (
        "/tokenize",
        {"model": "alpha", "content": "hi", "add_special": True},
    )
    assert known_routes(single)[0]("hi", "alpha") == ("/tokenize", {"content": "hi", "add_special": True})


def _campaign() -> list[CellResult]:
    """alpha: 32 ok (a swap of 40 ms against 2 warm), 64 rejected; beta: 32 ok, loaded already,
    64 crashed after a swap of 60 ms against 4."""
    return [
        _cell("alpha", 32, model_state="unloaded", swap_ttft_ms=40.0, warm_ttft_ms=2.0),
        _cell("beta", 32, model_state="loaded"),
        _cell("alpha", 64, "rejected", model_state="unloaded", swap_ttft_ms=30.0, warm_ttft_ms=3.0),
        _cell("beta", 64, "crashed", model_state="unloaded", swap_ttft_ms=60.0, warm_ttft_ms=4.0),
        _cell("beta", 64, "ok", concurrency=2, model_state="unloaded"),  # its probe got no token
    ]


def test_survival_and_tok_per_s_per_model():
    alpha, beta = model_figures(_campaign())
    assert (alpha.model, alpha.cells, alpha.survival) == (
        "alpha",
        2,
        {"ok": 1, "rejected": 1, "crashed": 0, "timed_out": 0},
    )
    assert beta.survival == {"ok": 2, "rejected": 0, "crashed": 1, "timed_out": 0}
    assert alpha.output_tok_per_s == 20.0 and beta.output_tok_per_s == 20.0  # 80 tokens over 4 s
    assert alpha.decode_tok_per_s == 50.0
    assert survival_counts([_cell(None, 32, "skipped")]) == {
        "ok": 0,
        "rejected": 0,
        "crashed": 0,
        "timed_out": 0,
        "skipped": 1,
    }
    assert model_figures([_cell(None, 32)]) == []


def test_swap_cost_is_the_median_swap_against_the_median_warm_first_token():
    assert swap_cost(_campaign()).model_dump() == {
        "samples": 3,
        "swap_ttft_ms": 40.0,
        "warm_ttft_ms": 3.0,
        "cost_ms": 37.0,
        "max_swap_ttft_ms": 60.0,
    }
    alpha, beta = model_figures(_campaign())
    assert (alpha.swap.samples, alpha.swap.swap_ttft_ms, alpha.swap.warm_ttft_ms, alpha.swap.cost_ms) == (
        2,
        35.0,
        2.5,
        32.5,
    )
    assert beta.swap.samples == 1
    assert swap_cost([_cell("a", 32)]).model_dump() == {
        "samples": 0,
        "swap_ttft_ms": None,
        "warm_ttft_ms": None,
        "cost_ms": None,
        "max_swap_ttft_ms": None,
    }


def test_a_survival_table_per_model_in_files_summary_and_report(tmp_path: Path):
    cells = _campaign()
    table = survival_table(cells, "beta")
    assert list(table.columns) == ["context", "c1-out4", "c2-out4"]
    assert table.astype(object).where(table.notna(), None).values.tolist() == [[32, "ok", None], [64, "crashed", "ok"]]
    paths = write_survival_tables(tmp_path, cells)
    assert sorted(paths) == ["survival alpha", "survival beta"]
    assert pd.read_csv(tmp_path / "survival" / "alpha.csv").values.tolist() == [[32, "ok"], [64, "rejected"]]
    assert write_survival_tables(tmp_path / "none", [_cell(None, 32)]) == {}

    summary = json.loads(json.dumps(models_summary(cells)))
    assert [m["model"] for m in summary["models"]] == ["alpha", "beta"]
    assert summary["models"][1]["survival_table"] == [
        {"context": 32, "c1-out4": "ok", "c2-out4": None},
        {"context": 64, "c1-out4": "crashed", "c2-out4": "ok"},
    ]
    assert summary["swap_cost"]["samples"] == 3
    assert models_summary([_cell(None, 32)]) == {}

    report = models_markdown(cells)
    assert "| alpha | 2 | 1 | 1 | 0 | 0 | 20.0 |" in report
    assert "## Survival: alpha" in report and "## Survival: beta" in report
    assert "| all | 3 | 40.0 | 3.0 | 37.0 | 60.0 |" in report
    assert "| 64 | crashed | ok |" in report
    assert models_markdown([_cell(None, 32)]) == ""


def test_cell_table_vllm_json_and_plot_name_the_model():
    cells = _campaign()
    table = cells_table(cells)
    assert {"model", "model_state", "swap_ttft_ms", "warm_ttft_ms"} <= set(table.columns)
    assert table.columns.tolist().index("model") == 1
    plain = cells_table([_cell(None, 32)])
    assert not {"model", "model_state", "swap_ttft_ms", "warm_ttft_ms"} & set(plain.columns)
    rows = pd.DataFrame(columns=["cell", "warmup", "outcome"])
    assert vllm_result(cells[1], rows, {"model": "alpha, beta"})["model_id"] == "beta"
    figure = campaign_figure(cells_frame(cells), "t")
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "alpha: concurrency 1" in labels and "beta: concurrency 1" in labels

"""A batch's figures per model (a router serving several), and how they reach the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from llmflow.batch.by_model import (
    BatchReportByModel,
    ModelFigures,
    ModelTally,
    merge_model_figures,
    model_figures,
    models_markdown,
    with_load_counts,
)
from llmflow.batch.client import run_batch
from llmflow.batch.report import merge_reports
from llmflow.config import BatchConfig
from llmflow.router import LoadCounts, swapped_out
from tests.conftest import serve_aiohttp


def _row(model: str, **fields) -> ModelFigures:
    base = dict(sent=0, succeeded=0, failed_http=0, unfinished=0, prompt_tokens=0, completion_tokens=0)
    return ModelFigures(model=model, output_tok_per_s=0.0, **{**base, **fields})


def test_tallies_become_figures_with_the_routers_counts():
    tallies = {"b": ModelTally(sent=2, succeeded=2, completion_tokens=8), "a": ModelTally(sent=1, failed_http=1)}
    tallies["b"].add_timings({"predicted_n": 8, "predicted_ms": 4.0})
    rows = model_figures(tallies, wall_s=2.0)
    assert [r.model for r in rows] == ["a", "b"]
    assert rows[1].output_tok_per_s == 4.0 and rows[1].server_timings["decode_tok_per_s"] == 2000.0
    counted = with_load_counts(
        rows, {"b": LoadCounts(loads=3, evictions=2, load_s=0.3, timed_loads=3), "c": LoadCounts(evictions=1)}
    )
    assert [(r.model, r.loads, r.evictions, r.load_s_mean) for r in counted] == [
        ("a", 0, 0, None),  # named by a line, never loaded (a model the router does not have)
        ("b", 3, 2, 0.1),
        ("c", 0, 1, None),  # cycled by the router, named by no line
    ]
    assert with_load_counts(rows, None) == rows  # not known stays None, not zero


def test_two_passes_merge_per_model():
    first = [_row("a", sent=2, succeeded=2, completion_tokens=10, loads=1, evictions=1, load_s_mean=0.2)]
    later = [
        _row("a", sent=1, succeeded=1, completion_tokens=5, loads=3, evictions=2, load_s_mean=0.4),
        _row("b", sent=1),
    ]
    merged = {r.model: r for r in merge_model_figures(first, later, wall_s=3.0)}
    a = merged["a"]
    assert (a.sent, a.succeeded, a.completion_tokens, a.loads, a.evictions) == (3, 3, 15, 4, 3)
    assert a.output_tok_per_s == 5.0 and a.load_s_mean == 0.35
    assert merged["b"].sent == 1


def test_markdown_table_has_a_row_per_model():
    report = BatchReportByModel(
        input_path=Path("i"), output_path=Path("o"), errors_path=Path("e"), input_lines=3, already_done=0, sent=3,
        succeeded=3, failed_http=0, unfinished=0, invalid_lines=0, prompt_tokens=0, completion_tokens=0, wall_s=1.0,
        retries=0, models=[_row("a", sent=2, loads=1, evictions=0), _row("b", sent=1)],
        load_counts_from="the router",
    )  # fmt: skip
    lines = models_markdown(report)
    assert "## Per model (loads and evictions from the router)" in lines
    assert any(line.startswith("| `a` | 2 |") and "| 1 | 0 |" in line for line in lines)
    assert any(line.startswith("| `b` | 1 |") and "| ? | ? |" in line for line in lines)
    merged = merge_reports(report, report)
    assert isinstance(merged, BatchReportByModel) and merged.models[0].sent == 4


def _write(path: Path, models: list[str]) -> None:
    path.write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": m, "prompt": f"c{i}", "max_tokens": 2}}) + "\n"
            for i, m in enumerate(models)
        )
    )  # fmt: skip


def test_client_counts_per_model_and_retries_a_swap_race_only(tmp_path: Path):
    """A router's "model name=X is not running" (evicted before the request reached it) is sent
    again; its "model 'nope' not found" is the line's answer, sent once."""
    _write(tmp_path / "in.jsonl", ["a", "b", "a", "nope", "b"])
    hits: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        hits[body["prompt"]] = hits.get(body["prompt"], 0) + 1
        if body["model"] == "nope":
            return web.json_response({"error": {"code": 400, "message": "model 'nope' not found"}}, status=400)
        if body["prompt"] == "c1" and hits["c1"] == 1:
            return web.json_response({"error": {"code": 400, "message": "model name=b is not running"}}, status=400)
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        return web.json_response(
            {"model": body["model"], "usage": usage, "timings": {"predicted_n": 2, "predicted_ms": 1.0}}
        )

    cfg = BatchConfig(input_path=tmp_path / "in.jsonl", output_path=tmp_path / "out.jsonl", backoff_s=0.01)

    async def scenario():
        runner, url = await serve_aiohttp(handle)
        try:
            return await run_batch(cfg, url, per_model=True, retry_answer=swapped_out)
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    assert isinstance(report, BatchReportByModel)
    assert (report.succeeded, report.failed_http, report.retries) == (4, 1, 1)
    assert hits["c1"] == 2 and hits["c3"] == 1
    rows = {r.model: (r.sent, r.succeeded, r.failed_http, r.completion_tokens) for r in report.models}
    assert rows == {"a": (2, 2, 0, 4), "b": (2, 2, 0, 4), "nope": (1, 0, 1, 0)}

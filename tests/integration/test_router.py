"""llama-server's router mode against the real binary: three tiny models with different random
weights in one models folder, loaded on demand, at most ``models_max`` at once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flows.batch import batch_inference
from llmflow.batch.by_model import BatchReportByModel
from llmflow.config import BatchConfig, LlamaRouter, LlamaServerEngine, ModelConfig, SessionConfig
from llmflow.router import log_counts
from llmflow.tiny_model import write_tiny_llama
from tests.conftest import llama_processes

pytestmark = pytest.mark.integration

MODELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Three models whose weights differ (seeds 1-3), named by their file stems."""
    folder = tmp_path_factory.mktemp("router") / "models"
    for seed, name in enumerate(MODELS, start=1):
        write_tiny_llama(folder / f"{name}.gguf", seed=seed)
    return folder


def router_session(binary: Path, models: Path, runs: Path, models_max: int) -> SessionConfig:
    return SessionConfig(
        engine=LlamaServerEngine(binary=binary, n_ctx=512, n_threads=1, router=LlamaRouter(models_max=models_max)),
        model=ModelConfig(path=models),
        runs_dir=runs,
    )


def interleaved_input(path: Path, n: int, unknown: int = 0) -> Path:
    """``n`` completions naming alpha, beta, gamma in turn; ``unknown`` more naming a model no
    file provides."""
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODELS[i % 3], "prompt": f"line {i}", "max_tokens": 4}}
        for i in range(n)
    ]  # fmt: skip
    lines += [
        {"custom_id": f"unknown{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "no-such-model", "prompt": "x", "max_tokens": 4}}
        for i in range(unknown)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(session: SessionConfig, src: Path, out: Path) -> BatchReportByModel:
    state = batch_inference(
        session=session,
        batch=BatchConfig(input_path=src, output_path=out, concurrency=4, fixed_output_tokens=4),
        return_state=True,
    )
    report = state.result().report
    assert isinstance(report, BatchReportByModel)
    return report


def router_log(runs: Path) -> str:
    (log,) = runs.glob("*/server.log")
    return log.read_text(errors="replace")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_models_through_one_router_of_two(llama_server_bin, models_dir: Path, tmp_path: Path, prefect_api_url):
    """200 lines over three models, at most two loaded: every line answered by the model it
    names, counts per model equal to the input's, the loads and evictions the report states are
    the router log's; a line naming a model the router does not have is that line's 400."""
    src = interleaved_input(tmp_path / "in.jsonl", 200, unknown=1)
    out = tmp_path / "out.jsonl"
    session = router_session(llama_server_bin, models_dir, tmp_path / "runs", models_max=2)
    report = run(session, src, out)

    assert (report.succeeded, report.failed_http, report.unfinished) == (200, 1, 0)
    answered = records(out)
    by_id = {r["custom_id"]: r["response"] for r in answered}
    assert by_id["unknown0"]["status_code"] == 400
    assert "not found" in by_id["unknown0"]["body"]["error"]["message"]
    ok = [r for r in answered if r["response"]["status_code"] == 200]
    wanted = Counter(MODELS[int(r["custom_id"][1:]) % 3] for r in ok)
    assert Counter(r["response"]["body"]["model"] for r in ok) == wanted == {"alpha": 67, "beta": 67, "gamma": 66}
    assert all(r["response"]["body"]["model"] == MODELS[int(r["custom_id"][1:]) % 3] for r in ok)

    rows = {m.model: m for m in report.models}
    assert set(rows) == {*MODELS, "no-such-model"}
    for name in MODELS:
        assert (rows[name].sent, rows[name].succeeded) == (wanted[name], wanted[name])
        assert rows[name].completion_tokens == 4 * wanted[name]
        assert rows[name].output_tok_per_s > 0 and rows[name].server_timings["decode_tok_per_s"] > 0
    assert (rows["no-such-model"].failed_http, rows["no-such-model"].loads) == (1, 0)

    logged = log_counts(router_log(session.runs_dir))
    for name in MODELS:
        assert (rows[name].loads, rows[name].evictions) == (logged[name].loads, logged[name].evictions), name
        assert rows[name].loads >= 1
    assert sum(rows[name].evictions for name in MODELS) >= 1  # three models in two places: something was evicted
    assert sum(r.loads for r in report.models) - sum(r.evictions for r in report.models) <= 2

    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert {m["model"]: m["loads"] for m in summary["batch"]["models"]} == {m: r.loads for m, r in rows.items()}
    assert llama_processes(str(tmp_path)) == []


def test_one_model_at_a_time_completes_and_counts_its_swaps(
    llama_server_bin, models_dir: Path, tmp_path: Path, prefect_api_url
):
    """``models_max: 1`` (one model on the GPU at a time): the same batch completes; every change
    of model is a swap, and the report's loads and evictions are the log's."""
    src = interleaved_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    session = router_session(llama_server_bin, models_dir, tmp_path / "runs", models_max=1)
    report = run(session, src, out)

    assert (report.succeeded, report.failed_http, report.unfinished) == (200, 0, 0)
    rows = {m.model: m for m in report.models}
    logged = log_counts(router_log(session.runs_dir))
    swaps = sum(rows[name].evictions for name in MODELS)
    assert swaps == sum(logged[name].evictions for name in MODELS) >= 2
    assert sum(rows[name].loads for name in MODELS) == swaps + 1  # one model stays loaded at the end
    for name in MODELS:
        assert (rows[name].loads, rows[name].evictions) == (logged[name].loads, logged[name].evictions), name
        assert (
            rows[name].load_s_mean is not None and rows[name].load_s_mean > 0
        )  # the swap's cost, as the router saw it
    assert llama_processes(str(tmp_path)) == []

"""Campaign logic without servers: the grid, skipping, campaign files, exact-length prompts,
the SSE client against a small real aiohttp server, reports, regressions and memory sampling."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from cli.main import main
from llmflow.bench.config import CampaignConfig, Cell, grid, load_campaign, skip_reason
from llmflow.bench.memory import group_rss_bytes
from llmflow.bench.metrics import server_figures
from llmflow.bench.prompts import PromptFactory, fit_prompt, prompt_text
from llmflow.bench.report import compare, markdown_report, vllm_result, write_outputs
from llmflow.bench.stream import StreamRequest, parse_event, run_requests
from llmflow.config import PROJECT_ROOT, LlamaServerEngine, VllmEngine
from llmflow.errors import CampaignFileError
from llmflow.results import CellResult
from tests.conftest import serve_aiohttp

CAMPAIGNS = PROJECT_ROOT / "benchmarks" / "campaigns"


def test_grid_runs_small_contexts_first_per_concurrency_and_skips_after_a_rejection():
    c = CampaignConfig(context_sizes=[128, 32, 64], concurrencies=[4, 1], output_tokens=[8])
    keys = [cell.key for cell in grid(c)]
    assert keys == [
        "ctx32-c1-out8",
        "ctx64-c1-out8",
        "ctx128-c1-out8",
        "ctx32-c4-out8",
        "ctx64-c4-out8",
        "ctx128-c4-out8",
    ]
    done = [CellResult(key="ctx64-c1-out8", context=64, concurrency=1, output_tokens=8, status="rejected")]
    assert (
        skip_reason(Cell(context=128, concurrency=1, output_tokens=8), done, ["rejected"]) == "context 64 was rejected"
    )
    assert (
        skip_reason(Cell(context=128, concurrency=4, output_tokens=8), done, ["rejected"]) is None
    )  # other concurrency
    assert skip_reason(Cell(context=32, concurrency=1, output_tokens=8), done, ["rejected"]) is None  # smaller
    assert skip_reason(Cell(context=128, concurrency=1, output_tokens=8), done, ["crashed"]) is None


def test_campaign_values_are_checked_with_the_field_named():
    with pytest.raises(ValueError, match="at least 1"):
        CampaignConfig(concurrencies=[0, 2])
    with pytest.raises(ValueError, match="distinct"):
        CampaignConfig(context_sizes=[64, 64])


def test_every_campaign_file_shipped_validates():
    files = sorted(CAMPAIGNS.glob("*.toml")) + sorted(CAMPAIGNS.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        campaign, session = load_campaign(path)
        assert campaign.name and session is not None
        assert Path(session["model"]["path"]).is_absolute()  # relative to the project root


def test_campaign_file_errors_name_the_file_and_field(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nconcurrencies = [1, "many"]\n')
    with pytest.raises(CampaignFileError, match=r"bad.toml: concurrencies\[1\]: Input should be a valid integer"):
        load_campaign(bad)
    bad.write_text("name = \n")
    with pytest.raises(CampaignFileError, match="not valid TOML"):
        load_campaign(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\ncontext_size: [1]\n")
    with pytest.raises(CampaignFileError, match="context_size: unknown key; did you mean 'context_sizes'"):
        load_campaign(typo)
    assert main(["bench", str(typo)]) == 2


def test_yaml_and_relative_paths(tmp_path: Path):
    f = tmp_path / "c.yml"
    f.write_text(
        "name: y\ncontext_sizes: [16]\noutput_dir: out/here\nsession:\n  engine: {kind: vllm, venv: .venvs/v}\n"
    )
    campaign, session = load_campaign(f)  # relative paths: from the file's own folder
    assert campaign.output_dir == tmp_path / "out" / "here"
    assert session["engine"]["venv"] == str(tmp_path / ".venvs" / "v")


def _char_counter(bos: int = 1):
    """A byte-level tokenizer: one token per character, plus BOS."""
    return lambda text: len(text) + bos


def _word_counter(text: str) -> int:
    """Coarser: a token per word and per pad character, a BOS."""
    return 1 + len(text.rstrip(".").split()) + (len(text) - len(text.rstrip(".")))


@pytest.mark.parametrize("counter", [_char_counter(), _word_counter], ids=["chars", "words"])
@pytest.mark.parametrize("target", [16, 17, 64, 255, 1000])
def test_fit_prompt_is_exact(counter, target):
    text, n = fit_prompt("9f3ac2e1", target, counter)
    assert n == target == counter(text)
    assert text.startswith("9f3ac2e1: ")


def test_fit_prompt_reports_an_unreachable_target():
    text, n = fit_prompt("a-long-unique-id", 3, _char_counter())
    assert n > 3 and text == prompt_text("a-long-unique-id", 0)


def test_prompt_factory_measures_the_tokenizer_offset_and_reuses_the_shape():
    """vLLM-like API: /tokenize counts without BOS here, completions count it; the factory
    learns the difference from one probe. (Transport mocked: this is the arithmetic.)"""
    calls = {"tokenize": 0, "completions": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            calls["tokenize"] += 1
            return httpx.Response(200, json={"count": len(body["prompt"])})
        calls["completions"] += 1
        return httpx.Response(200, json={"usage": {"prompt_tokens": len(body["prompt"]) + 1}})

    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))
    factory = PromptFactory(client, VllmEngine(), "m")
    assert factory.offset == 1 and calls["completions"] == 1
    uids = [f"t-ctx100-r0-{i:05d}" for i in range(20)]
    prompts = factory.prompts(uids, 100)
    assert [n for _, n in prompts] == [100] * 20 and all(len(t) + 1 == 100 for t, _ in prompts)
    assert len({t for t, _ in prompts}) == 20  # unique prefixes
    first = calls["tokenize"]
    factory.prompts(uids[:1], 100)
    assert calls["tokenize"] - first > 1  # a search ...
    assert first < 20 + 2 * 20  # ... but later uids reuse its shape: about one count each


def test_llama_server_tokenize_request_asks_for_special_tokens():
    from llmflow import engines

    assert engines.spec_for(LlamaServerEngine()).tokenize_request("hi", "m") == (
        "/tokenize",
        {"content": "hi", "add_special": True},
    )


def test_parse_event():
    assert parse_event(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_event(b"data: [DONE]\n") is None
    assert parse_event(b": ping\n") is None
    assert parse_event(b"data: not json\n") is None


async def _sse(request: web.Request) -> web.StreamResponse:
    """A small real SSE server: ``mode`` picks usage / no usage / cut off / 400."""
    body = await request.json()
    mode = body["prompt"]
    if mode == "reject":
        return web.json_response({"error": "too long"}, status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if mode == "slow":
        await asyncio.sleep(2.0)  # nothing within the client's read timeout
    for i, text in enumerate(["a", "", "b", "c"]):  # one token decodes to no text
        await resp.write(
            b"data: " + json.dumps({"choices": [{"text": text, "finish_reason": None}]}).encode() + b"\n\n"
        )
        await asyncio.sleep(0.01)
        if mode == "cut" and i == 1:
            return resp  # the server goes away mid-stream
    await resp.write(b"data: " + json.dumps({"choices": [{"text": "", "finish_reason": "length"}]}).encode() + b"\n\n")
    if mode == "usage":
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}\n\n')
    await resp.write(b"data: [DONE]\n\n")
    return resp


def test_stream_client_outcomes_against_a_real_sse_server():
    async def go():
        runner, url = await serve_aiohttp(_sse)
        reqs = [
            StreamRequest(m, json.dumps({"prompt": m}).encode(), 7, 4)
            for m in ("usage", "chunks", "cut", "reject", "slow")
        ]
        seen = []
        try:
            results, wall = await run_requests(url, "k", reqs, 2, 0.5, on_done=lambda i, s, t: seen.append(i))
        finally:
            await runner.cleanup()
        return results, wall, seen

    results, wall, seen = asyncio.run(go())
    (_, usage), (_, chunks), (_, cut), (_, reject), (_, slow) = results
    assert usage.outcome == "ok" and usage.usage_source == "server" and usage.completion_tokens == 4
    assert len(usage.chunk_times) == 5  # every chunk of a choice, the empty-text ones too (as vLLM's benchmark)
    assert chunks.outcome == "ok" and chunks.usage_source == "chunks" and chunks.completion_tokens == 4
    assert chunks.prompt_tokens == 7  # the measured prompt length
    assert cut.outcome == "crashed" and "[DONE]" in cut.error
    assert reject.outcome == "rejected" and reject.status_code == 400
    assert slow.outcome == "timed_out" and slow.status_code == 200
    assert sorted(seen) == [0, 1, 2, 3, 4] and wall > 0


def test_server_figures_from_vllm_histograms_and_llama_server_timings():
    v = server_figures(
        {
            "prompt_tokens": 200,
            "generation_tokens": 40,
            "prefill_seconds": 0.5,
            "decode_seconds": 2.0,
            "ttft_seconds": 0.3,
            "ttft_count": 3,
        },
        None,
    )
    assert v.server_prefill_tok_per_s == 400 and v.server_decode_tok_per_s == 20
    assert v.server_mean_ttft_ms == pytest.approx(100)
    ls = server_figures(None, {"prompt_n": 100, "prompt_ms": 50, "predicted_n": 30, "predicted_ms": 300, "cache_n": 2})
    assert ls.server_prefill_tok_per_s == 2000 and ls.server_decode_tok_per_s == 100
    assert ls.server_cached_prompt_tokens == 2 and ls.server_prompt_tokens is None


def _cell(key="ctx32-c1-out8", status="ok", **summary) -> CellResult:
    return CellResult(
        key=key,
        context=32,
        concurrency=1,
        output_tokens=8,
        status=status,
        requests=2,
        summary={
            "completed": 2,
            "prefill_tok_per_s": 100.0,
            "decode_tok_per_s": 50.0,
            "mean_ttft_ms": 10.0,
            "output_throughput": 80.0,
            **summary,
        },
    )


def test_compare_flags_worse_cells_only_beyond_the_threshold():
    base = [
        {"key": "a", "status": "ok", "output_throughput": 100.0, "mean_ttft_ms": 10.0},
        {"key": "b", "status": "ok", "output_throughput": 100.0},
        {"key": "gone", "status": "ok"},
    ]
    now = [
        {"key": "a", "status": "ok", "output_throughput": 95.0, "mean_ttft_ms": 12.0},  # ttft +20%: flagged
        {"key": "b", "status": "crashed"},
        {"key": "new", "status": "ok", "output_throughput": 1.0},
    ]
    found = compare(now, base, 0.10)
    assert [(f["key"], f["metric"]) for f in found] == [("a", "mean_ttft_ms"), ("b", "status")]
    assert found[0]["change"] == pytest.approx(0.2)
    assert compare(now, base, 0.5)[-1]["metric"] == "status"


def test_outputs_and_vllm_json_and_report(tmp_path: Path):
    rows = tmp_path / "requests.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "cell": "ctx32-c1-out8",
                    "warmup": True,
                    "outcome": "ok",
                    "prompt_tokens": 32,
                    "completion_tokens": 8,
                    "ttft_s": 0.5,
                    "itl_s": [0.1],
                    "error": None,
                },
                {
                    "cell": "ctx32-c1-out8",
                    "warmup": False,
                    "outcome": "ok",
                    "prompt_tokens": 32,
                    "completion_tokens": 8,
                    "ttft_s": 0.01,
                    "itl_s": [0.1, 0.2],
                    "error": None,
                },
                {
                    "cell": "ctx32-c1-out8",
                    "warmup": False,
                    "outcome": "ok",
                    "prompt_tokens": 32,
                    "completion_tokens": 8,
                    "ttft_s": 0.02,
                    "itl_s": [0.1],
                    "error": None,
                },
            ]
        )
        + '\n{"cell": "torn'
    )
    cells = [
        _cell(),
        _cell("ctx64-c1-out8", "rejected"),
        CellResult(
            key="ctx128-c1-out8",
            context=128,
            concurrency=1,
            output_tokens=8,
            status="skipped",
            reason="context 64 was rejected",
        ),
    ]
    cells[1].context = 64
    meta = {"name": "t", "engine": "vllm", "model": "m", "date": "20261127-000000"}
    paths = write_outputs(tmp_path, cells, rows, meta, [])
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    v = json.loads((tmp_path / "vllm" / "ctx32-c1-out8.json").read_text())
    assert v["ttfts"] == [0.01, 0.02] and v["output_lens"] == [8, 8] and v["max_concurrency"] == 1  # warm-up left out
    assert v["backend"] == "vllm" and v["mean_ttft_ms"] == 10.0
    summary = json.loads(paths["summary"].read_text())
    assert [c["status"] for c in summary["cells"]] == ["ok", "rejected", "skipped"]
    md = markdown_report(
        {**meta, "sessions": 1},
        cells,
        [{"key": "ctx32-c1-out8", "metric": "status", "baseline": "ok", "current": "x", "change": None}],
        paths,
    )
    assert (
        "| ctx32-c1-out8 | ok | 2/2 | 80.0 | " in md  # output_throughput, the first figure column
        and "| 10.0 | " in md  # mean_ttft_ms
        and "prefill_tok_per_s (tok/s)" in md
        and "context 64 was rejected" in md
        and "Regressions" in md
    )
    assert vllm_result(cells[2], __import__("pandas").DataFrame(), meta)["ttfts"] == []


def test_group_rss_counts_the_whole_process_group():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"], start_new_session=True)
    try:
        assert group_rss_bytes(proc.pid) > 0
        assert group_rss_bytes(2**22 + 7) == 0
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

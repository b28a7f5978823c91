"""The batch client against a small real HTTP server on loopback that injects faults.

The server is an aiohttp app in this process: a fake *model*, but real sockets and real
HTTP, so retries, timeouts and resume are exercised as they happen.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from llmflow.batch.client import run_batch
from llmflow.config import BatchConfig, Timeouts
from tests.conftest import serve_aiohttp as _serve


class FaultyServer:
    """Answers completions; ``flaky-*`` ids fail with 500 once, ``bad-*`` get 400, ``dead-*`` always
    503, ``refused-*`` always 500 (as llama-cpp-python answers ``max_tokens: -1``)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.auth: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        cid = body["prompt"]
        self.hits[cid] += 1
        self.auth.append(request.headers.get("Authorization"))
        if cid.startswith("bad-"):
            return web.json_response({"error": {"message": "context too long"}}, status=400)
        if cid.startswith("dead-"):
            return web.json_response({"error": "overloaded"}, status=503)
        if cid.startswith("refused-"):
            return web.json_response({"error": {"message": "max_tokens must be positive"}}, status=500)
        if cid.startswith("flaky-") and self.hits[cid] == 1:
            return web.json_response({"error": "boom"}, status=500)
        if cid.startswith("slow-") and self.hits[cid] == 1:
            await asyncio.sleep(1.0)
        usage = {"prompt_tokens": 3, "completion_tokens": body.get("max_tokens", 5), "total_tokens": 8}
        return web.json_response({"choices": [{"text": "ok"}], "usage": usage}, headers={"x-request-id": f"r-{cid}"})


def _write_input(path: Path, ids: list[str]) -> None:
    with path.open("w") as f:
        for cid in ids:
            f.write(
                json.dumps(
                    {
                        "custom_id": cid,
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"prompt": cid, "max_tokens": 5},
                    }
                )
                + "\n"
            )


def _output_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_retries_5xx_not_4xx_and_gives_up(tmp_path: Path, transport: str):
    ids = [f"ok-{i}" for i in range(20)] + ["flaky-1", "flaky-2", "bad-1", "dead-1", "slow-1", "refused-1"]
    _write_input(tmp_path / "in.jsonl", ids)
    cfg = BatchConfig(
        input_path=tmp_path / "in.jsonl",
        output_path=tmp_path / "out.jsonl",
        concurrency=4,
        max_attempts=3,
        backoff_s=0.01,
        backoff_max_s=0.02,
        timeouts=Timeouts(read=0.5),
    )
    fake = FaultyServer()

    async def scenario():
        runner, url = await _serve(fake.handle)
        try:
            return await run_batch(cfg, url, "k", transport=transport, body_overrides={"max_tokens": 7})
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    assert fake.hits["flaky-1"] == 2 and fake.hits["bad-1"] == 1 and fake.hits["dead-1"] == 3
    assert fake.hits["slow-1"] == 2  # read timeout, then retried
    assert fake.hits["refused-1"] == 3  # a 500 is retried, and on the last attempt it is the answer
    assert report.succeeded == 23 and report.failed_http == 2 and report.unfinished == 1
    assert report.failed_statuses == {400: 1, 500: 1}
    assert report.completion_tokens == 23 * 7  # body_overrides reached the server
    assert set(fake.auth) == {"Bearer k"}
    out = [json.loads(line) for line in cfg.output_path.read_text().splitlines()]
    # 400 and the lasting 500 are final and recorded; the 503 (not ready) is left for a rerun
    assert sorted(r["custom_id"] for r in out) == sorted(i for i in ids if i != "dead-1")
    (refused,) = [r for r in out if r["custom_id"] == "refused-1"]
    assert refused["response"]["status_code"] == 500 and refused["error"]["code"] == "500"
    errors = {e["custom_id"]: e for e in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())}
    assert {cid: e["line"] for cid, e in errors.items()} == {"bad-1": 23, "dead-1": 24, "refused-1": 26}
    assert "gave up after 3 attempts" in errors["dead-1"]["reason"]
    assert errors["bad-1"]["reason"] == "answered HTTP 400: context too long"
    assert errors["refused-1"]["reason"] == "answered HTTP 500: max_tokens must be positive"
    assert not report.finished and not report.with_failures  # dead-1 is unfinished


def test_rerun_sends_only_what_is_missing(tmp_path: Path):
    ids = [f"ok-{i}" for i in range(30)]
    _write_input(tmp_path / "in.jsonl", ids)
    cfg = BatchConfig(input_path=tmp_path / "in.jsonl", output_path=tmp_path / "out.jsonl", concurrency=3)
    # a previous run finished the first 10 and was killed while writing the 11th
    first = "".join(json.dumps({"custom_id": c, "response": {"status_code": 200}}) + "\n" for c in ids[:10])
    cfg.output_path.write_text(first + '{"custom_id": "ok-10", "resp')
    fake = FaultyServer()

    async def scenario():
        runner, url = await _serve(fake.handle)
        try:
            return await run_batch(cfg, url)
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    assert report.already_done == 10 and report.sent == 20
    assert set(fake.hits) == set(ids[10:]) and max(fake.hits.values()) == 1
    assert sorted(_output_ids(cfg.output_path)) == sorted(ids)


def test_connection_refused_is_retried_then_reported(tmp_path: Path):
    _write_input(tmp_path / "in.jsonl", ["a", "b"])
    cfg = BatchConfig(
        input_path=tmp_path / "in.jsonl",
        output_path=tmp_path / "out.jsonl",
        max_attempts=2,
        backoff_s=0.01,
        backoff_max_s=0.01,
    )
    report = asyncio.run(run_batch(cfg, "http://127.0.0.1:9"))  # discard port: nothing listens
    assert report.unfinished == 2 and report.retries == 2
    assert not cfg.output_path.read_text()


class MixedServer:
    """Answers completions, chat and embeddings as llama.cpp does (an embedding's usage has no
    completion_tokens), and keeps every body it was sent."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies[body["cid"]] = body
        if request.path == "/v1/embeddings":
            usage = {"prompt_tokens": 4, "total_tokens": 4}
            return web.json_response({"object": "list", "data": [{"embedding": [0.5, -0.5]}], "usage": usage})
        usage = {"prompt_tokens": 3, "completion_tokens": body.get("max_tokens", 5), "total_tokens": 8}
        return web.json_response({"choices": [{"text": "ok"}], "usage": usage, "model": body.get("model")})


def _mixed_input(path: Path) -> None:
    lines = [
        ("c", "/v1/completions", {"prompt": "p", "model": "gpt-4o-mini"}),
        ("h", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini"}),
        ("e", "/v1/embeddings", {"input": ["a", "b"], "model": "text-embedding-3-small"}),
        ("n", "/v1/completions", {"prompt": "no model named"}),
    ]
    path.write_text(
        "".join(
            json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {**body, "cid": cid}}) + "\n"
            for cid, url, body in lines
        )
    )


@pytest.mark.parametrize("rewrite", [False, True])
def test_embeddings_lines_get_no_output_fields_and_the_served_name_when_asked(tmp_path: Path, rewrite: bool):
    _mixed_input(tmp_path / "in.jsonl")
    cfg = BatchConfig(
        input_path=tmp_path / "in.jsonl", output_path=tmp_path / "out.jsonl", rewrite_model_to_served_name=rewrite
    )
    fake = MixedServer()

    async def scenario():
        runner, url = await _serve(fake.handle, paths=("/v1/completions", "/v1/chat/completions", "/v1/embeddings"))
        try:
            return await run_batch(cfg, url, body_overrides={"max_tokens": 2, "min_tokens": 2}, served_name="tiny")
        finally:
            await runner.cleanup()

    report = asyncio.run(scenario())
    assert report.succeeded == 4 and report.failed_http == 0
    assert report.prompt_tokens == 3 * 3 + 4 and report.completion_tokens == 3 * 2  # the embedding adds no output
    assert "max_tokens" not in fake.bodies["e"] and fake.bodies["c"]["min_tokens"] == 2
    models = {cid: body.get("model") for cid, body in fake.bodies.items()}
    if rewrite:
        assert models == {"c": "tiny", "h": "tiny", "e": "tiny", "n": "tiny"}
    else:
        assert models == {"c": "gpt-4o-mini", "h": "gpt-4o-mini", "e": "text-embedding-3-small", "n": None}
    out = {r["custom_id"]: r for r in map(json.loads, cfg.output_path.read_text().splitlines())}
    assert out["e"]["response"]["body"]["data"][0]["embedding"] == [0.5, -0.5]


def test_rewriting_needs_the_served_name(tmp_path: Path):
    _mixed_input(tmp_path / "in.jsonl")
    cfg = BatchConfig(
        input_path=tmp_path / "in.jsonl", output_path=tmp_path / "out.jsonl", rewrite_model_to_served_name=True
    )
    with pytest.raises(ValueError, match="served_name"):
        asyncio.run(run_batch(cfg, "http://127.0.0.1:9"))

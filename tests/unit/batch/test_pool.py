"""One batch spread over several servers (the replicas' pool), against small real HTTP servers.

The replica set is played by ``Replicas`` below: it adds, removes and replaces servers the way
``flows.replicas.ReplicaSet`` does, so the batch's side (least outstanding, waiting for the
first replica, moving requests off a lost one, exactly once) is tested on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from aiohttp import web

from llmflow.batch.client import run_batch
from llmflow.batch.pool import EndpointPool
from llmflow.config import BatchConfig
from tests.conftest import serve_aiohttp


class Server:
    """A completions server that counts what it answered; ``delay_s`` per request."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.answered = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(self.delay_s)
        self.answered += 1
        usage = {"prompt_tokens": 2, "completion_tokens": body["max_tokens"], "total_tokens": 2 + body["max_tokens"]}
        return web.json_response({"choices": [{"text": "ok"}], "usage": usage})

    async def start(self) -> Server:
        self.runner, self.url = await serve_aiohttp(self.handle)
        return self

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class Replicas:
    """Plays the replica set: ``on_suspect`` decides what happens to a server that failed."""

    def __init__(self, servers: dict[str, Server], on_suspect=None) -> None:
        self.servers = servers
        self.on_suspect = on_suspect
        self.pool: EndpointPool | None = None
        self.suspected: list[str] = []

    def attach(self, pool: EndpointPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        for name, server in self.servers.items():
            pool.add(name, server.url, None)

    def detach(self, pool: EndpointPool) -> None:
        self.pool = None

    def suspect(self, name: str) -> None:
        self.suspected.append(name)
        if self.on_suspect:
            self.on_suspect(self, name)


def _config(tmp_path: Path, n: int, concurrency: int = 8) -> BatchConfig:
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(n):
            body = {"prompt": f"p{i}", "max_tokens": 3}
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return BatchConfig(
        input_path=path, output_path=tmp_path / "out.jsonl", concurrency=concurrency, backoff_s=0.01, backoff_max_s=0.01
    )


def _ids(cfg: BatchConfig) -> Counter:
    return Counter(json.loads(line)["custom_id"] for line in cfg.output_path.read_text().splitlines())


def test_spreads_over_every_replica_least_outstanding_first(tmp_path: Path):
    async def main():
        fast, slow = await Server(0.001).start(), await Server(0.02).start()
        cfg = _config(tmp_path, 400)
        report = await run_batch(cfg, replicas=Replicas({"fast": fast, "slow": slow}))
        await fast.stop()
        await slow.stop()
        return cfg, report, fast, slow

    cfg, report, fast, slow = asyncio.run(main())
    assert set(_ids(cfg).values()) == {1} and len(_ids(cfg)) == 400
    assert fast.answered + slow.answered == 400
    assert fast.answered > 2 * slow.answered > 0, "the quicker server gets more: fewer outstanding at any time"
    figures = {e.name: e for e in report.endpoints}
    assert figures["fast"].answered == fast.answered and figures["slow"].completion_tokens == 3 * slow.answered


def test_waits_for_the_first_replica_and_takes_later_ones(tmp_path: Path):
    async def main():
        a, b = await Server().start(), await Server().start()
        replicas = Replicas({})
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, lambda: replicas.pool.add("a", a.url, None))
        loop.call_later(0.35, lambda: replicas.pool.add("b", b.url, None))
        report = await run_batch(_config(tmp_path, 1000), replicas=replicas)
        await a.stop()
        await b.stop()
        return report, a, b

    report, a, b = asyncio.run(main())
    assert report.succeeded == 1000 and report.unfinished == 0 and report.waited_s >= 0.25
    assert a.answered > 0 and b.answered > 0


def test_requests_of_a_lost_replica_move_to_the_others_exactly_once(tmp_path: Path):
    async def main():
        a, b, c = await Server(0.005).start(), await Server(0.005).start(), await Server(0.005).start()

        def replace(replicas: Replicas, name: str) -> None:  # lost: out, and a new server in its place
            replicas.pool.remove(name)
            replicas.pool.add("c", c.url, None)

        replicas = Replicas({"a": a, "b": b}, on_suspect=replace)
        cfg = _config(tmp_path, 600)

        async def lose_b() -> None:
            while b.answered < 50:
                await asyncio.sleep(0.005)
            await b.stop()

        loser = asyncio.create_task(lose_b())
        report = await run_batch(cfg, replicas=replicas)
        await loser
        await a.stop()
        await c.stop()
        return cfg, report, replicas, c

    cfg, report, replicas, c = asyncio.run(main())
    ids = _ids(cfg)
    assert len(ids) == 600 and set(ids.values()) == {1}
    assert report.unfinished == 0 and report.retries == 0, "a move is not a retry"
    assert replicas.suspected == ["b"] and report.moved >= 1 and c.answered > 0
    assert {e.name: e.moved_away for e in report.endpoints}["b"] >= report.moved


def test_no_replica_left_stops_the_pass_resumably(tmp_path: Path):
    async def main():
        a = await Server(0.005).start()

        def give_up(replicas: Replicas, name: str) -> None:
            replicas.pool.remove(name)
            replicas.pool.close("every replica was lost")

        cfg = _config(tmp_path, 400, concurrency=4)

        async def lose_a() -> None:
            while a.answered < 40:
                await asyncio.sleep(0.005)
            await a.stop()

        loser = asyncio.create_task(lose_a())
        report = await run_batch(cfg, replicas=Replicas({"a": a}, on_suspect=give_up))
        await loser
        return cfg, report

    cfg, report = asyncio.run(main())
    assert report.stopped_early and 0 < report.unfinished < 400 - 40
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert any("no replica left: every replica was lost" in e["reason"] for e in errors)
    assert len(_ids(cfg)) + report.unfinished == report.sent


def test_a_replaced_endpoints_sender_is_closed_with_the_pool():
    """A replica that came back at another address gets a new sender; the old one (its requests
    in flight may still use it) is closed when the pool is, not left open."""

    class Sender:
        def __init__(self, url: str) -> None:
            self.url, self.closed = url, False

        async def aclose(self) -> None:
            self.closed = True

    made: list[Sender] = []

    def make(url: str, key: str | None) -> Sender:
        made.append(Sender(url))
        return made[-1]

    async def scenario() -> None:
        pool = EndpointPool(make)
        pool.add("r0", "http://127.0.0.1:1", None)
        pool.add("r0", "http://127.0.0.1:1", None)  # the same address: the same sender
        pool.add("r0", "http://127.0.0.1:2", None)  # moved: a new sender
        assert [s.url for s in made] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        assert not any(s.closed for s in made)
        await pool.aclose()

    asyncio.run(scenario())
    assert all(s.closed for s in made)

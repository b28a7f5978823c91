"""The campaign's streaming client: send one cell's requests, time every chunk.

Each request is a streamed ``/v1/completions`` call with ``stream_options.include_usage``;
the client notes when each chunk of a choice arrives, with text or without (``time.perf_counter``,
relative to sending): as ``vllm bench serve`` counts them, since a token can stream as empty text
(a partial UTF-8 character held back, a special token), and skipping those chunks moved TTFT to
a later token and merged ITL gaps (measured: TTFT p50 1.45x vLLM's, ITL p50 2.4x, with the tiny
byte-level model, whose chunks are half empty; benchmarks/vllm_agreement.py) and keeps the final ``usage`` (and llama-server's ``timings``). Where the server
sends no usage in a stream (llama-cpp-python), the completion length is the number of chunks
of a choice still generating (it sends one per token, some with empty text) and the row says
so (``usage_source``). A stream that closes before ``data: [DONE]`` counts as crashed. aiohttp, as in the
batch client: it was the fastest transport measured (benchmarks/client_throughput.py).

Two ways to load a cell: closed loop (``run_requests``: a fixed number in flight, the next sent
as one finishes) and open loop (``run_open_loop``: each request sent at its scheduled time from
``arrival_schedule``, whether or not earlier ones finished, optionally capped in flight; stopped
early when ``Saturation`` says the server cannot keep up).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import numpy as np

from llmflow.auth import bearer
from llmflow.bench.metrics import RequestTiming, Saturation, classify, saturation_reason


@dataclass(frozen=True)
class StreamRequest:
    """One prepared request of a cell."""

    uid: str
    body: bytes
    prompt_tokens: int  # what the prompt measures, as the server counts it
    output_tokens: int


def completion_body(model: str, prompt: str, fixed: dict[str, Any]) -> bytes:
    return json.dumps(
        {"model": model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **fixed}
    ).encode()


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line of a server-sent event stream; None for anything else."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


@asynccontextmanager
async def _sessions(
    headers: dict[str, str], timeout: aiohttp.ClientTimeout, limit: int
) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
    """A pooled session for the requests and one that never reuses a connection (``stream_one``'s
    ``fresh``), both with ``limit`` connections."""
    async with (
        aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=limit)) as pooled,
        aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=limit, force_close=True)
        ) as fresh,
    ):
        yield pooled, fresh


async def stream_one(
    session: aiohttp.ClientSession, url: str, req: StreamRequest, fresh: aiohttp.ClientSession | None = None
) -> tuple[float, RequestTiming]:
    """Send ``req``; return when it was sent (perf_counter) and what came back.

    A request that failed before any response arrived is sent once more, on a new connection
    (``fresh``: a session that never reuses one): a pooled keep-alive connection that the
    server had just closed fails that way (aiohttp's "Can not write request body"), which is
    the client's race, not the server's failure. A server that is really gone fails again.
    """
    sent, timing = await _stream_once(session, url, req)
    if timing.outcome == "crashed" and timing.status_code is None and fresh is not None:
        sent, timing = await _stream_once(fresh, url, req)
    return sent, timing.model_copy(update={"end_s": time.perf_counter() - sent})


async def _stream_once(session: aiohttp.ClientSession, url: str, req: StreamRequest) -> tuple[float, RequestTiming]:
    base = {"requested_prompt_tokens": req.prompt_tokens, "requested_output_tokens": req.output_tokens}
    sent = time.perf_counter()
    times: list[float] = []
    token_chunks = 0  # chunks of a choice still generating: one per token on llama-cpp-python
    done = False
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    status: int | None = None
    try:
        async with session.post(url, data=req.body) as resp:
            status = resp.status
            if status != 200:
                detail = (await resp.read())[:500].decode("utf-8", "replace")
                return sent, RequestTiming(outcome=classify(status), status_code=status, error=detail, **base)
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                event = parse_event(line)
                if event is None:
                    continue
                if "error" in event:  # an error reported inside an open stream
                    return sent, RequestTiming(
                        outcome="crashed", status_code=status, error=json.dumps(event)[:500], **base
                    )
                choices = event.get("choices") or []
                if choices:  # a chunk of a choice is a token's arrival, text or not (vllm bench serve's rule)
                    times.append(time.perf_counter() - sent)
                if choices and choices[0].get("finish_reason") is None:
                    token_chunks += 1
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("timings"):
                    timings = event["timings"]
    except TimeoutError:
        return sent, RequestTiming(
            outcome="timed_out",
            status_code=status,
            error="no data within the request timeout",
            chunk_times=times,
            **base,
        )
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        return sent, RequestTiming(
            outcome="crashed", status_code=status, error=f"{type(exc).__name__}: {exc}", chunk_times=times, **base
        )
    if not done:  # the server closed the stream before its end marker
        return sent, RequestTiming(
            outcome="crashed", status_code=status, error="stream ended without [DONE]", chunk_times=times, **base
        )
    if usage:
        prompt, completion, source = usage.get("prompt_tokens"), usage.get("completion_tokens"), "server"
    else:
        prompt, completion, source = req.prompt_tokens, token_chunks, "chunks"
    return sent, RequestTiming(
        outcome="ok",
        status_code=status,
        chunk_times=times,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_source=source,
        server_timings=timings,
        **base,
    )


async def run_requests(
    base_url: str,
    api_key: str | None,
    requests: list[StreamRequest],
    concurrency: int,
    timeout_s: float,
    on_done: Any = None,
) -> tuple[list[tuple[float, RequestTiming]], float]:
    """All ``requests``, at most ``concurrency`` in flight; each result as (start offset in the
    cell, timing), in request order, and the wall time from the first send to the last answer.
    ``on_done(index, offset, timing)`` is called as each finishes (to append it to disk)."""
    headers = {"Content-Type": "application/json", **bearer(api_key)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s)
    url = base_url.rstrip("/") + "/v1/completions"
    slots = asyncio.Semaphore(concurrency)
    results: list[tuple[float, RequestTiming] | None] = [None] * len(requests)
    async with _sessions(headers, timeout, concurrency) as (session, fresh):
        start = time.perf_counter()

        async def one(i: int, req: StreamRequest) -> None:
            async with slots:
                sent, timing = await stream_one(session, url, req, fresh)
            results[i] = (sent - start, timing)
            if on_done is not None:
                on_done(i, sent - start, timing)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def arrival_schedule(
    n: int,
    rate: float,
    burstiness: float = 1.0,
    arrival: Literal["poisson", "constant"] = "poisson",
    seed: int | Sequence[int] = 0,
) -> list[float]:
    """Scheduled send times of ``n`` requests at ``rate`` per second, in seconds from the cell's
    start, as ``vllm bench serve`` (``get_request``) draws them: gaps from a gamma distribution
    with shape ``burstiness`` and mean ``1/rate`` (burstiness 1: exponential gaps, a Poisson
    process; below 1 burstier, above 1 more even), summed and then scaled so the last request
    is due at ``n/rate`` exactly. ``constant``: one every ``1/rate`` s. The same ``seed`` gives
    the same schedule."""
    if n < 1:
        return []
    if arrival == "constant":
        return [(i + 1) / rate for i in range(n)]
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))
    return (times * ((n / rate) / times[-1])).tolist()


@dataclass
class OpenLoopRun:
    """What an open-loop run did: per request (in request order) its scheduled time and actual
    send (s from the start; None if never sent) and its timing; the wall time from the start to
    the last answer (or to the stop); why it stopped early (the saturation rule), if it did."""

    results: list[tuple[float, float | None, RequestTiming]]
    wall: float
    saturated: str | None


async def run_open_loop(
    base_url: str,
    api_key: str | None,
    requests: list[StreamRequest],
    schedule: list[float],
    max_in_flight: int,
    timeout_s: float,
    saturation: Saturation | None = None,
    on_done: Any = None,
) -> OpenLoopRun:
    """Send each request at its ``schedule`` time (s from the start, ascending), at most
    ``max_in_flight`` at once (a request due while all slots are taken waits, and that wait is
    its send delay). Each timing's ``send_delay`` is its actual send minus its schedule, so its
    TTFT and E2EL count from the scheduled time. When ``saturation`` fires, every request still
    in flight is cancelled (its connection closed) and those not yet sent are not sent: both
    come back as ``cancelled``. ``on_done(index, scheduled, sent, timing)`` is called for every
    request as it finishes or is cancelled."""
    headers = {"Content-Type": "application/json", **bearer(api_key)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s)
    url = base_url.rstrip("/") + "/v1/completions"
    slots = asyncio.Semaphore(max_in_flight)
    results: list[tuple[float, float | None, RequestTiming] | None] = [None] * len(requests)
    sent_at: dict[int, float] = {}
    finished = 0
    reason: str | None = None

    def done(i: int, sent: float | None, timing: RequestTiming) -> None:
        results[i] = (schedule[i], sent, timing)
        if on_done is not None:
            on_done(i, schedule[i], sent, timing)

    async with _sessions(headers, timeout, max_in_flight) as (session, fresh):
        start = time.perf_counter()

        async def one(i: int, req: StreamRequest) -> None:
            nonlocal finished
            await asyncio.sleep(max(0.0, start + schedule[i] - time.perf_counter()))
            async with slots:
                sent_at[i] = time.perf_counter() - start
                sent, timing = await stream_one(session, url, req, fresh)
            offset = sent - start
            finished += 1
            done(i, offset, timing.model_copy(update={"send_delay": max(0.0, offset - schedule[i])}))

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]

        async def watch(rule: Saturation) -> None:
            nonlocal reason
            counts: list[tuple[int, int]] = []
            while True:
                await asyncio.sleep(rule.window_s)
                counts.append((bisect.bisect_right(schedule, time.perf_counter() - start), finished))
                reason = saturation_reason(counts, rule)
                if reason:
                    for task in tasks:
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch(saturation)) if saturation is not None and saturation.windows else None
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - start
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    for i, req in enumerate(requests):
        if results[i] is None:
            if not isinstance(outcomes[i], asyncio.CancelledError):
                raise outcomes[i]  # a bug, not a measurement
            sent = sent_at.get(i)
            cut = RequestTiming(
                outcome="cancelled",
                error="in flight when the cell stopped saturated" if sent is not None else "not sent: cell saturated",
                requested_prompt_tokens=req.prompt_tokens,
                requested_output_tokens=req.output_tokens,
                send_delay=max(0.0, sent - schedule[i]) if sent is not None else 0.0,
                end_s=wall - sent if sent is not None else None,
            )
            done(i, sent, cut)
    return OpenLoopRun([r for r in results if r is not None], wall, reason)

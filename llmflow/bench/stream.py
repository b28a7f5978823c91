"""The campaign's streaming client: send one cell's requests, time every chunk.

Each request is a streamed ``/v1/completions`` call with ``stream_options.include_usage``;
the client notes when each chunk carrying text arrives (``time.perf_counter``, relative to
sending) and keeps the final ``usage`` (and llama-server's ``timings``). Where the server
sends no usage in a stream (llama-cpp-python), the completion length is the number of chunks
of a choice still generating (it sends one per token, some with empty text) and the row says
so (``usage_source``). A stream that closes before ``data: [DONE]`` counts as crashed. aiohttp, as in the
batch client: it was the fastest transport measured (benchmarks/client_throughput.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmflow.auth import bearer
from llmflow.bench.metrics import RequestTiming, classify


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
    return sent, timing


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
                if choices and choices[0].get("text"):
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
            text_chunk_times=times,
            **base,
        )
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        return sent, RequestTiming(
            outcome="crashed", status_code=status, error=f"{type(exc).__name__}: {exc}", text_chunk_times=times, **base
        )
    if not done:  # the server closed the stream before its end marker
        return sent, RequestTiming(
            outcome="crashed", status_code=status, error="stream ended without [DONE]", text_chunk_times=times, **base
        )
    if usage:
        prompt, completion, source = usage.get("prompt_tokens"), usage.get("completion_tokens"), "server"
    else:
        prompt, completion, source = req.prompt_tokens, token_chunks, "chunks"
    return sent, RequestTiming(
        outcome="ok",
        status_code=status,
        text_chunk_times=times,
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
    async with (
        aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
        ) as session,
        aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency, force_close=True)
        ) as fresh,
    ):
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

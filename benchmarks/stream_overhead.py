"""The campaign client's own overhead: TTFT and throughput next to plain streaming loops.

Side by side, in one run, against the same server, the same prompts, concurrency and count:

* ``llmflow stream client`` - ``llmflow.bench.stream.run_requests``, what every campaign cell runs
  (aiohttp, SSE parsing, per-chunk timestamps, usage, the finished-request callback);
* ``plain httpx loop``      - ``httpx.AsyncClient.stream`` and ``aiter_lines``, first text chunk timed;
* ``openai AsyncOpenAI``    - ``completions.create(stream=True)``, first text chunk timed.

Each client resends a request once when its connection was dropped before the answer
(llama-server drops kept-alive connections now and then): llmflow on a new connection, the
httpx loop likewise, the openai SDK by its own ``max_retries=1``.

Two servers: a synthetic SSE server (uvicorn, in its own process) whose first chunk leaves after
exactly ``--first-ms`` and then one chunk every ``--gap-ms``, so the true TTFT is known and the
client's overhead is what is measured above it; and llama.cpp's llama-server with the tiny
model (if scripts/build_llama_server.sh built it), a real engine. Each client runs
``--repeats`` times, interleaved; medians are reported with ratios to each plain loop
(TTFT ratio < 1 and throughput ratio > 1 mean llmflow is the faster).

Run: ``.venv/bin/python benchmarks/stream_overhead.py [--requests 400] [--concurrency 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from client_throughput import free_port  # noqa: E402

SSE_APP = """
import asyncio, json, os
FIRST = float(os.environ["FIRST_MS"]) / 1000
GAP = float(os.environ["GAP_MS"]) / 1000

def event(obj):
    return b"data: " + json.dumps(obj).encode() + b"\\n\\n"

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    raw = b""
    while True:
        msg = await receive()
        raw += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    n = json.loads(raw or b"{}").get("max_tokens", 16)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await asyncio.sleep(FIRST)
    for i in range(n):
        if i:
            await asyncio.sleep(GAP)
        await send({"type": "http.response.body", "body": event({"choices": [{"index": 0, "text": "x", "finish_reason": None}]}), "more_body": True})
    await send({"type": "http.response.body", "body": event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}), "more_body": True})
    await send({"type": "http.response.body", "body": event({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}}), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\\n\\n"})
"""


def wait_ready(url: str, proc: subprocess.Popen, path: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + path, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server at {url} did not come up")
        time.sleep(0.2)


def start_sse(workdir: Path, first_ms: float, gap_ms: float) -> tuple[subprocess.Popen, str]:
    (workdir / "sse_app.py").write_text(SSE_APP)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "sse_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
        env={"FIRST_MS": str(first_ms), "GAP_MS": str(gap_ms), "PATH": "/usr/bin:/bin"},
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/")
    return proc, url


def start_llama_server() -> tuple[subprocess.Popen, str] | None:
    from llmflow.config import DEFAULT_LLAMA_SERVER, DEFAULT_MODEL

    if not DEFAULT_LLAMA_SERVER.exists() or not DEFAULT_MODEL.exists():
        return None
    port = free_port()
    proc = subprocess.Popen(
        [
            str(DEFAULT_LLAMA_SERVER),
            "--model",
            str(DEFAULT_MODEL),
            "--alias",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            "4096",
            "--parallel",
            "16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/health")
    return proc, url


def prompts(n: int) -> list[str]:
    # distinct first characters per request: no prefix-cache help for anyone
    return [f"{i:05d} " + "the of and to in is " * 4 for i in range(n)]


def fixed(out: int) -> dict:
    return {"max_tokens": out, "ignore_eos": True}


async def llmflow_client(url: str, texts: list[str], out: int, concurrency: int) -> tuple[list[float], float]:
    from llmflow.bench.stream import StreamRequest, completion_body, run_requests

    reqs = [StreamRequest(str(i), completion_body("bench", t, fixed(out)), 0, out) for i, t in enumerate(texts)]
    results, wall = await run_requests(url, None, reqs, concurrency, 60.0)
    bad = [t for _, t in results if t.outcome != "ok"]
    assert not bad, bad[0]
    return [t.chunk_times[0] for _, t in results], wall


async def httpx_client(url: str, texts: list[str], out: int, concurrency: int) -> tuple[list[float], float]:
    import httpx

    slots = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def attempt(text: str) -> float | None:
            sent, first = time.perf_counter(), None
            body = {
                "model": "bench",
                "prompt": text,
                "stream": True,
                "stream_options": {"include_usage": True},
                **fixed(out),
            }
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                        choices = json.loads(line[5:]).get("choices") or []
                        if choices and choices[0].get("text"):
                            first = time.perf_counter() - sent
            return first

        async def one(text: str) -> None:
            async with slots:
                try:
                    ttfts.append(await attempt(text))
                except (
                    httpx.RemoteProtocolError
                ):  # a kept-alive connection the server had dropped: once more, as llmflow does
                    ttfts.append(await attempt(text))

        start = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return ttfts, time.perf_counter() - start


async def openai_client(url: str, texts: list[str], out: int, concurrency: int) -> tuple[list[float], float]:
    import httpx
    from openai import AsyncOpenAI

    slots = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncOpenAI(
        base_url=url + "/v1", api_key="none", max_retries=1, http_client=httpx.AsyncClient(limits=limits, timeout=60)
    ) as client:

        async def one(text: str) -> None:
            async with slots:
                sent, first = time.perf_counter(), None
                stream = await client.completions.create(
                    model="bench",
                    prompt=text,
                    max_tokens=out,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - sent
                ttfts.append(first)

        start = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return ttfts, time.perf_counter() - start


CLIENTS = {
    "llmflow stream client": llmflow_client,
    "plain httpx loop": httpx_client,
    "openai AsyncOpenAI": openai_client,
}


def run_on(url: str, n: int, out: int, concurrency: int, repeats: int) -> dict[str, dict[str, float]]:
    texts = prompts(n)
    samples: dict[str, dict[str, list[float]]] = {name: {"ttft_ms": [], "req_s": []} for name in CLIENTS}
    for fn in CLIENTS.values():  # one warm-up each
        asyncio.run(fn(url, texts[:concurrency], out, concurrency))
    for _ in range(repeats):
        for name, fn in CLIENTS.items():
            ttfts, wall = asyncio.run(fn(url, texts, out, concurrency))
            samples[name]["ttft_ms"].append(statistics.mean(ttfts) * 1000)
            samples[name]["req_s"].append(n / wall)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def report(title: str, medians: dict[str, dict[str, float]], out: int) -> None:
    ours = medians["llmflow stream client"]
    print(f"\n{title}")
    print(f"{'client':<24}{'mean TTFT ms':>14}{'req/s':>10}{'output tok/s':>14}{'TTFT ratio':>12}{'tput ratio':>12}")
    for name, m in medians.items():
        print(
            f"{name:<24}{m['ttft_ms']:>14.2f}{m['req_s']:>10.1f}{m['req_s'] * out:>14.0f}"
            f"{ours['ttft_ms'] / m['ttft_ms']:>12.3f}{ours['req_s'] / m['req_s']:>12.3f}"
        )
    print("(ratios: llmflow over that client; TTFT < 1 and throughput > 1 favour llmflow)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-ms", type=float, default=20.0, help="synthetic server: delay before the first chunk")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="synthetic server: delay between chunks")
    parser.add_argument("--server", choices=["synthetic", "llama-server", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.server in ("synthetic", "both"):
            proc, url = start_sse(Path(tmp), args.first_ms, args.gap_ms)
            try:
                medians = run_on(url, args.requests, args.output_tokens, args.concurrency, args.repeats)
            finally:
                proc.terminate()
                proc.wait(10)
            report(
                f"synthetic SSE server (true TTFT {args.first_ms:.0f} ms, {args.output_tokens} chunks {args.gap_ms} ms apart), "
                f"{args.requests} requests, {args.concurrency} in flight, medians of {args.repeats}",
                medians,
                args.output_tokens,
            )
        if args.server in ("llama-server", "both"):
            started = start_llama_server()
            if started is None:
                print("\nllama-server: not built (scripts/build_llama_server.sh); skipped")
                return
            proc, url = started
            try:
                medians = run_on(url, args.requests, args.output_tokens, args.concurrency, args.repeats)
            finally:
                proc.terminate()
                proc.wait(10)
            report(
                f"llama-server, tiny model, {args.requests} requests, {args.concurrency} in flight, medians of {args.repeats}",
                medians,
                args.output_tokens,
            )


if __name__ == "__main__":
    main()

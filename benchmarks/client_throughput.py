"""Batch client throughput against a server fast enough that the client is the bottleneck.

Side by side, in one run, same server, same concurrency, same request count:

* ``llmflow run_batch (aiohttp)`` - the project's batch client as the batch task runs it:
  reads the input JSONL, sends, parses ``usage``, appends each output record to a file;
* ``llmflow run_batch (httpx)``   - the same with the httpx transport;
* ``bare aiohttp loop``           - the client `vllm bench serve` uses, doing nothing else;
* ``httpx + httpx-aiohttp loop``  - httpx's API over the aiohttp transport, nothing else;
* ``openai AsyncOpenAI loop``     - the official client, nothing else.

The server is a minimal ASGI app under uvicorn in its own process, answering a fixed
completion JSON at once. Each client runs ``--repeats`` times; the median is reported with the
ratio to the bare aiohttp loop. ``--memory-lines N`` also runs the batch client on an N-line
input in a fresh process and reports its peak RSS next to a 10,000-line run, to show memory
does not grow with the input (stream, don't load).

Run: ``.venv/bin/python benchmarks/client_throughput.py [--requests 3000] [--memory-lines 1000000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESPONSE = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "bench",
        "choices": [{"text": " hello world", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
    }
).encode()

SERVER_APP = f"""
RESPONSE = {RESPONSE!r}
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while True:
        msg = await receive()
        if not msg.get("more_body"):
            break
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": RESPONSE}})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    (workdir / "bench_app.py").write_text(SERVER_APP)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.post(url + "/v1/completions", content=b"{}")
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": "bench", "prompt": f"request {i}", "max_tokens": 16},
                    }
                )
                + "\n"
            )


BODY = {"model": "bench", "prompt": "request", "max_tokens": 16}


async def bare_aiohttp(url: str, n: int, concurrency: int) -> None:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            async with sem:
                async with session.post(url + "/v1/completions", json=BODY) as resp:
                    json.loads(await resp.read())

        await asyncio.gather(*(one() for _ in range(n)))


async def httpx_aiohttp_loop(url: str, n: int, concurrency: int) -> None:
    import httpx
    from httpx_aiohttp import AiohttpTransport

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(transport=AiohttpTransport(), base_url=url) as client:

        async def one() -> None:
            async with sem:
                (await client.post("/v1/completions", json=BODY)).json()

        await asyncio.gather(*(one() for _ in range(n)))


async def openai_loop(url: str, n: int, concurrency: int) -> None:
    from openai import AsyncOpenAI

    sem = asyncio.Semaphore(concurrency)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    async def one() -> None:
        async with sem:
            await client.completions.create(model="bench", prompt="request", max_tokens=16)

    await asyncio.gather(*(one() for _ in range(n)))
    await client.close()


def llmflow_runner(transport: str):
    from llmflow.batch.client import run_batch
    from llmflow.config import BatchConfig

    async def run(url: str, n: int, concurrency: int, workdir: Path) -> None:
        src = workdir / f"in-{n}.jsonl"
        if not src.exists():
            write_input(src, n)
        out = workdir / f"out-{transport}.jsonl"
        out.unlink(missing_ok=True)
        cfg = BatchConfig(input_path=src, output_path=out, concurrency=concurrency)
        report = await run_batch(cfg, url, transport=transport)
        assert report.succeeded == n, report

    return run


def measure(fn, url: str, n: int, concurrency: int, workdir: Path) -> float:
    started = time.perf_counter()
    if "workdir" in fn.__code__.co_varnames:
        asyncio.run(fn(url, n, concurrency, workdir))
    else:
        asyncio.run(fn(url, n, concurrency))
    return n / (time.perf_counter() - started)


def memory_probe(url: str, lines: int, workdir: Path) -> dict:
    """Run the batch client on ``lines`` requests in a fresh process; its peak RSS and time."""
    code = (
        "import asyncio, json, resource, sys, time; sys.path.insert(0, sys.argv[4]);"
        "from llmflow.batch.client import run_batch; from llmflow.config import BatchConfig; from pathlib import Path;"
        "cfg = BatchConfig(input_path=Path(sys.argv[1]), output_path=Path(sys.argv[2]), concurrency=16);"
        "t = time.perf_counter(); r = asyncio.run(run_batch(cfg, sys.argv[3])); wall = time.perf_counter() - t;"
        "print(json.dumps({'lines': r.input_lines, 'succeeded': r.succeeded, 'wall_s': round(wall, 1),"
        " 'req_per_s': round(r.succeeded / wall), 'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))"
    )
    src, out = workdir / f"mem-{lines}.jsonl", workdir / f"mem-out-{lines}.jsonl"
    write_input(src, lines)
    out.unlink(missing_ok=True)
    res = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out), url, str(ROOT)], capture_output=True, text=True, check=True
    )
    result = json.loads(res.stdout)
    result["input_mib"] = round(src.stat().st_size / 2**20, 1)
    src.unlink()
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-lines", type=int, default=0, help="also measure peak RSS on an input this long")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    clients = {
        "llmflow run_batch (aiohttp)": llmflow_runner("aiohttp"),
        "llmflow run_batch (httpx)": llmflow_runner("httpx"),
        "bare aiohttp loop": bare_aiohttp,
        "httpx + httpx-aiohttp loop": httpx_aiohttp_loop,
        "openai AsyncOpenAI loop": openai_loop,
    }
    with tempfile.TemporaryDirectory(prefix="llmflow-bench-") as tmp:
        workdir = Path(tmp)
        server, url = start_server(workdir)
        try:
            measure(bare_aiohttp, url, 500, args.concurrency, workdir)  # warm-up
            results: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
                for name, fn in clients.items():
                    results[name].append(measure(fn, url, args.requests, args.concurrency, workdir))
            memory = []
            if args.memory_lines:
                for lines in (10_000, args.memory_lines):
                    memory.append(memory_probe(url, lines, workdir))
        finally:
            server.terminate()
            server.wait(10)

    base = statistics.median(results["bare aiohttp loop"])
    print(f"\n{args.requests} requests x {args.repeats} repeats, concurrency {args.concurrency}, cpus {os.cpu_count()}")
    print(f"{'client':32} {'median req/s':>12} {'vs bare aiohttp':>16}   runs")
    rows = []
    for name, runs in results.items():
        med = statistics.median(runs)
        rows.append(
            {
                "client": name,
                "median_req_per_s": round(med),
                "ratio_vs_aiohttp": round(med / base, 3),
                "runs": [round(r) for r in runs],
            }
        )
        print(f"{name:32} {med:12.0f} {med / base:16.2f}   {', '.join(f'{r:.0f}' for r in runs)}")
    for m in memory:
        print(
            f"memory: {m['lines']:>9,} lines ({m['input_mib']} MiB input): peak RSS {m['peak_rss_mib']} MiB, "
            f"{m['req_per_s']} req/s, {m['wall_s']} s"
        )
    if args.json:
        args.json.write_text(json.dumps({"throughput": rows, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()

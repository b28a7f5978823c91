"""A model server stand-in with a fixed capacity and a fixed time per token, cheap on the CPU.

It serves ``--slots`` requests at once (like a GPU server's batch slots; the rest wait in its
queue) and spends ``--token-ms`` of sleep per output token, so one server's throughput is
``slots / (max_tokens * token-ms)`` whatever the machine, and N of them should give N times
that. Used by ``benchmarks/replica_scaling.py`` through the ``command`` engine.

Run: ``python benchmarks/slot_server.py --host 127.0.0.1 --port 8000 [--slots 4] [--token-ms 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web


def make_app(slots: int, token_s: float) -> web.Application:
    gate = asyncio.Semaphore(slots)
    served = {"requests": 0}

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        tokens = int(body.get("max_tokens") or 16)
        async with gate:
            started = time.perf_counter()
            await asyncio.sleep(tokens * token_s)
            served["requests"] += 1
        usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
        return web.json_response(
            {
                "id": f"cmpl-{served['requests']}",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "x" * tokens, "finish_reason": "length"}],
                "usage": usage,
                "timings": {"predicted_ms": (time.perf_counter() - started) * 1000, "predicted_n": tokens},
            }
        )

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "slot-server", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=4, help="requests served at once")
    parser.add_argument("--token-ms", type=float, default=5.0, help="sleep per output token")
    args = parser.parse_args()
    web.run_app(make_app(args.slots, args.token_ms / 1000), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

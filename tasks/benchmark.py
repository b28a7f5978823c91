"""Run one benchmark cell: exact-length prompts, warm-up, timed streaming requests, figures.

Every request's row is appended to the campaign's ``requests.jsonl`` as it finishes, so a
crash loses nothing that was measured; the cell's summary is the task's persisted result.
The warm-up requests all finish before the first timed one is sent (rows carry wall-clock
``sent_at``/``ended_at`` to show it). A cell with a ``rate`` is open loop: its requests go
out on an arrival schedule (``stream.arrival_schedule``), and the saturation rule may end it
early as ``saturated``.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from llmflow import engines
from llmflow.aio import run_sync
from llmflow.batch.jsonl import JsonlAppender
from llmflow.bench.config import CampaignConfig, Cell, cell_result
from llmflow.bench.memory import PeakSampler
from llmflow.bench.metrics import (
    BENCH_COUNTERS,
    LATENCIES,
    RequestTiming,
    cell_status,
    cell_summary,
    request_metrics,
    server_figures,
)
from llmflow.bench.prompts import PromptFactory
from llmflow.bench.report import fmt
from llmflow.bench.stream import StreamRequest, arrival_schedule, completion_body, run_open_loop, run_requests
from llmflow.bench.swap import SwapProbe, probe_swap
from llmflow.config import SessionConfig
from llmflow.engines.figures import add_timings, counter_delta, read_counters, timings_summary
from llmflow.placements import driver_for
from llmflow.results import CellResult, ServerHandle, Tunnel

PROMPT_ATTEMPTS_AFTER_SWAP = 4  # a router closing connections for a moment after a swap: 0.5, 1, 1.5 s apart


def request_row(
    cell: Cell,
    repeat: int,
    index: int,
    warmup: bool,
    start_s: float | None,
    t: RequestTiming,
    scheduled_s: float | None = None,
    ended_at: float | None = None,
) -> dict[str, Any]:
    """One row of requests.parquet. ``start_s``: when it was sent, ``scheduled_s``: when it
    was due (open loop; closed loop: the same), both from the start of its repeat;
    ``ended_at``: wall-clock (unix) time it ended, now when not given."""
    m = request_metrics(t)
    timings = t.server_timings or {}
    ended_at = time.time() if ended_at is None else ended_at
    return {
        "cell": cell.key,
        **({} if cell.model is None else {"model": cell.model}),
        "context": cell.context,
        "concurrency": cell.concurrency,
        "rate": cell.rate,
        "output_tokens": cell.output_tokens,
        "repeat": repeat,
        "index": index,
        "warmup": warmup,
        "start_s": start_s,
        "scheduled_s": start_s if scheduled_s is None else scheduled_s,
        "send_delay_s": t.send_delay,
        "sent_at": ended_at - t.end_s if t.end_s is not None else None,
        "ended_at": ended_at,
        "outcome": t.outcome,
        "status_code": t.status_code,
        "error": t.error,
        **{f"{name}_s": m[name] for name in LATENCIES},
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "requested_prompt_tokens": t.requested_prompt_tokens,
        "requested_output_tokens": t.requested_output_tokens,
        "usage_source": t.usage_source,
        "server_prompt_n": timings.get("prompt_n"),
        "server_prompt_ms": timings.get("prompt_ms"),
        "server_cache_n": timings.get("cache_n"),
        "server_predicted_n": timings.get("predicted_n"),
        "server_predicted_ms": timings.get("predicted_ms"),
    }


def _failed_before_sending(cell: Cell, exc: httpx.HTTPError, session_no: int) -> CellResult:
    """Preparing prompts needs the server: a refused or reset connection means it is gone."""
    status = "crashed"
    if isinstance(exc, httpx.HTTPStatusError) and 400 <= exc.response.status_code < 500:
        status = "rejected"  # e.g. a tokenizer that refuses a prompt past the model's length
    return cell_result(cell, status, reason=f"preparing prompts: {type(exc).__name__}: {exc}"[:500], session=session_no)


def shape_check(client: httpx.Client, model: str, prompt: str, fixed: dict[str, Any]) -> tuple[str, str] | None:
    """One plain (not streamed) request of the cell's shape before anything is timed.

    A stream cannot carry a status once it has started: llama-cpp-python answers 200 to an
    over-long prompt and closes the stream empty. Unstreamed, the same request gets its 400,
    so a cell past the context limit is ``rejected`` with the server's own words. Returns
    (status, detail) when the server refuses or fails, None when it answers.
    """
    try:
        resp = client.post("/v1/completions", json={"model": model, "prompt": prompt, **fixed})
    except httpx.TimeoutException as exc:
        return "timed_out", f"shape check: {type(exc).__name__}: {exc}"
    except httpx.TransportError as exc:
        return "crashed", f"shape check: {type(exc).__name__}: {exc}"
    if resp.status_code < 400:
        return None
    status = "rejected" if resp.status_code < 500 else "crashed"
    return status, f"shape check: HTTP {resp.status_code}: {resp.text[:400]}"


def drain(client: httpx.Client, model: str) -> str:
    """After a saturated cell, wait until the server has worked off what the cell left behind.

    The cell's requests still queued were abandoned, not all cancelled: a server that does not
    notice a closed connection (llama-cpp-python) goes on generating them, into the next cell's
    timing. A 1-token request queues behind them on a server that serialises, so its answer
    says they are done (a server that cancels them answers at once). Returns a line for the log.
    """
    started = time.monotonic()
    try:
        resp = client.post("/v1/completions", json={"model": model, "prompt": "drain", "max_tokens": 1})
        how = f"HTTP {resp.status_code}"
    except httpx.HTTPError as exc:
        how = type(exc).__name__
    return f"drained: a 1-token request answered ({how}) {time.monotonic() - started:.1f}s after the cell ended"


def _measure_prompts(
    client: httpx.Client, engine: object, model: str, uids: list[str], cell: Cell, attempts: int
) -> tuple[PromptFactory, list[tuple[str, int]]]:
    """The cell's prompts, measured; a connection closed unanswered is tried again up to
    ``attempts`` times in all: a router right after a swap has been seen to close connections
    for a moment (twice within 20 ms in CI), while a server that is gone fails every time."""
    for attempt in range(1, attempts + 1):
        try:
            factory = PromptFactory(client, engine, model)
            return factory, factory.prompts(uids, cell.context)
        except httpx.RemoteProtocolError as exc:
            if attempt == attempts:
                raise
            get_run_logger().warning("cell %s: %s; measuring the prompts again in %.1f s", cell.key, exc, attempt / 2)
            time.sleep(attempt / 2)
    raise AssertionError("unreachable: the last attempt returns or raises")


@task(name="run-benchmark-cell", timeout_seconds=6 * 3600, persist_result=True, cache_policy=NO_CACHE)
def run_benchmark_cell(
    session: SessionConfig,
    campaign: CampaignConfig,
    cell: Cell,
    handle: ServerHandle,
    tunnel: Tunnel,
    rows_path: Path,
    session_no: int = 1,
) -> CellResult:
    """Run ``cell`` ``campaign.repeats`` times after its warm-up; summarise it.

    Not retried: a failure is a measurement (rejected, crashed ...), recorded as such.
    """
    logger = get_run_logger()
    api_key = handle.api_key()
    spec = engines.spec_for(session.engine)
    fixed = spec.fixed_length_fields(cell.output_tokens)
    n = cell.concurrency * campaign.rounds if cell.rate is None else max(1, round(cell.rate * campaign.open_loop_s))
    pgid = driver_for(session).memory_group(handle)  # None where this machine cannot see the server
    model = cell.model or handle.served_name
    probe: SwapProbe | None = None
    # a router tier (cell.model set) can end a kept-alive connection unanswered around a load or
    # an eviction, so its cells' set-up requests each get a connection of their own
    fresh = {"limits": httpx.Limits(max_keepalive_connections=0)} if cell.model is not None else {}
    with httpx.Client(
        base_url=tunnel.base_url, headers=handle.auth_headers(), timeout=campaign.request_timeout_s, **fresh
    ) as client:
        if cell.model is not None:  # before the prompts: measuring them loads the model
            probe = probe_swap(client, tunnel.base_url, api_key, model, fixed, campaign.request_timeout_s)
            _log_probe(cell, probe)
        # short random ids: unique prefixes that leave room for small contexts
        uids = [secrets.token_hex(4) for _ in range(1 + campaign.warmup_requests + campaign.repeats * n)]
        try:
            attempts = PROMPT_ATTEMPTS_AFTER_SWAP if probe is not None else 1
            factory, prompts = _measure_prompts(client, session.engine, model, uids, cell, attempts)
        except httpx.HTTPError as exc:
            logger.warning("cell %s: %s", cell.key, exc)
            return _failed_before_sending(cell, exc, session_no).model_copy(update=_probe_fields(probe))
        logger.info(
            "cell %s: %d prompts of %d tokens ready (%d tokenizer calls)",
            cell.key,
            len(prompts),
            cell.context,
            factory.calls,
        )
        refused = shape_check(client, model, prompts[0][0], fixed)
        if refused is not None:
            status, detail = refused
            logger.info("cell %s: %s before timing: %s", cell.key, status, detail)
            return cell_result(cell, status, reason=detail, session=session_no, **_probe_fields(probe))
        reqs = [
            StreamRequest(uid, completion_body(model, text, fixed), count, cell.output_tokens)
            for uid, (text, count) in zip(uids[1:], prompts[1:])
        ]
        warm, timed = reqs[: campaign.warmup_requests], reqs[campaign.warmup_requests :]

        timings: list[RequestTiming] = []
        duration = 0.0
        cpu_s = 0.0  # the orchestrator's process, every thread: the client's CPU on this machine
        saturated: str | None = None
        with JsonlAppender(rows_path) as rows:
            if warm:  # closed loop, run to its end before anything is timed
                _send(tunnel.base_url, api_key, warm, min(cell.concurrency, len(warm)), campaign, cell, rows, -1)
            before = read_counters(spec.metrics_path, tunnel.base_url, api_key, BENCH_COUNTERS)
            with PeakSampler(pgid) as memory:
                for r in range(campaign.repeats):
                    batch = timed[r * n : (r + 1) * n]
                    cpu0 = time.process_time()
                    if cell.rate is None:
                        done, wall = _send(tunnel.base_url, api_key, batch, cell.concurrency, campaign, cell, rows, r)
                    else:
                        done, wall, saturated = _send_open_loop(
                            tunnel.base_url, api_key, batch, campaign, cell, rows, r
                        )
                    cpu_s += time.process_time() - cpu0
                    timings += done
                    duration += wall
                    if saturated:
                        logger.info("cell %s: %s", cell.key, saturated)
                        break
            after = read_counters(spec.metrics_path, tunnel.base_url, api_key, BENCH_COUNTERS)
        if saturated:
            logger.info("cell %s: %s", cell.key, drain(client, model))

    result = _verdict(
        cell, timings, duration, counter_delta(before, after), memory, session_no, campaign.slo, saturated, cpu_s
    ).model_copy(update=_probe_fields(probe))
    summary = result.summary
    logger.info(
        "cell %s: %s; %d/%d ok, %s output tok/s, mean TTFT %s ms, client CPU %s",
        cell.key,
        result.status,
        summary.completed,
        len(timings),
        fmt(summary.output_throughput),
        fmt(summary.mean_ttft_ms),
        "-" if summary.client_cpu_share is None else f"{summary.client_cpu_share:.2f} CPUs",
    )
    return result


def _probe_fields(probe: SwapProbe | None) -> dict[str, Any]:
    """The swap probe's figures as ``CellResult`` fields (none without a probe)."""
    if probe is None:
        return {}
    return {"model_state": probe.state, "swap_ttft_ms": probe.swap_ttft_ms, "warm_ttft_ms": probe.warm_ttft_ms}


def _log_probe(cell: Cell, probe: SwapProbe) -> None:
    logger = get_run_logger()
    if probe.error:
        logger.warning("cell %s: model %s was %s; %s", cell.key, cell.model, probe.state, probe.error)
    elif probe.swap_ttft_ms is not None:
        logger.info(
            "cell %s: model %s was %s; first token after the swap in %.1f ms, warm %.1f ms",
            cell.key,
            cell.model,
            probe.state,
            probe.swap_ttft_ms,
            probe.warm_ttft_ms,
        )


def _send(
    base_url: str,
    api_key: str | None,
    requests: list[StreamRequest],
    concurrency: int,
    campaign: CampaignConfig,
    cell: Cell,
    rows: JsonlAppender,
    repeat: int,
) -> tuple[list[RequestTiming], float]:
    """Stream ``requests`` at ``concurrency``, appending each one's row as it finishes (repeat -1:
    the warm-up); their timings in order, and the wall time."""
    results, wall = run_sync(
        lambda: run_requests(
            base_url,
            api_key,
            requests,
            concurrency,
            campaign.request_timeout_s,
            on_done=lambda i, start, t: rows.write(request_row(cell, repeat, i, repeat < 0, start, t)),
        )
    )
    return [t for _, t in results], wall


def _send_open_loop(
    base_url: str,
    api_key: str | None,
    requests: list[StreamRequest],
    campaign: CampaignConfig,
    cell: Cell,
    rows: JsonlAppender,
    repeat: int,
) -> tuple[list[RequestTiming], float, str | None]:
    """``requests`` on the arrival schedule of ``cell.rate`` (seeded by the campaign's seed and
    the repeat), at most ``cell.concurrency`` in flight, each row appended as it ends; their
    timings in order, the wall time, and why it stopped saturated (None if it did not)."""
    assert cell.rate is not None
    schedule = arrival_schedule(
        len(requests), cell.rate, campaign.burstiness, campaign.arrival, (campaign.seed, repeat)
    )
    run = run_sync(
        lambda: run_open_loop(
            base_url,
            api_key,
            requests,
            schedule,
            cell.concurrency,
            campaign.request_timeout_s,
            campaign.saturation,
            on_done=lambda i, due, sent, t: rows.write(request_row(cell, repeat, i, False, sent, t, due)),
        )
    )
    return [t for _, _, t in run.results], run.wall, run.saturated


def _verdict(
    cell: Cell,
    timings: list[RequestTiming],
    duration: float,
    counters: dict[str, float] | None,
    memory: PeakSampler,
    session_no: int,
    slo: Any = None,
    saturated: str | None = None,
    client_cpu_s: float | None = None,
) -> CellResult:
    """The cell's result: the client's summary, the server's figures, its status and why."""
    summary = cell_summary(timings, duration, slo, client_cpu_s)
    sums: dict[str, float] = {}
    for t in timings:
        if t.outcome == "ok" and t.server_timings:
            add_timings(sums, t.server_timings)
    status = cell_status(summary, saturated=bool(saturated))
    first_error = saturated if status == "saturated" else next((t.error for t in timings if t.error), None)
    return cell_result(
        cell,
        status,
        reason=first_error[:500] if first_error and status != "ok" else None,
        requests=sum(1 for t in timings if t.outcome != "cancelled" or t.end_s is not None),
        summary=summary,
        server=server_figures(counters, timings_summary(sums)),
        peak_rss_mib=memory.peak_rss_mib,
        peak_gpu_mib=memory.peak_gpu_mib,
        session=session_no,
    )

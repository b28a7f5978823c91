"""Benchmark arithmetic for stress-test campaigns, defined the way `vllm bench serve` defines it.

Pure functions on timings a streaming client recorded, so every rule is unit-tested:

* TTFT: from sending the request to the first chunk that carries text.
* E2EL: from sending to the last chunk with a token.
* TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token.
* ITL: the gaps between successive chunks with text.
* Throughput over the cell's wall time; mean, median, std and p50/p90/p99 of each latency.

Token counts come from the server's ``usage`` (not re-tokenised text). Key names match
``vllm bench serve --save-result`` where the metric is the same (``mean_ttft_ms``,
``p99_itl_ms``, ``output_throughput`` ...), so the two can be read side by side.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

Outcome = Literal["ok", "rejected", "crashed", "timed_out"]
PERCENTILES = (50, 90, 99)


class RequestTiming(BaseModel):
    """What the streaming client saw of one request (times in seconds from sending it)."""

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    text_chunk_times: list[float] = Field(default_factory=list, description="Arrival of each chunk that carried text.")
    prompt_tokens: int | None = Field(default=None, description="From the server's usage.")
    completion_tokens: int | None = Field(default=None, description="From the server's usage.")
    requested_prompt_tokens: int | None = None
    requested_output_tokens: int | None = None


def classify(status_code: int | None, error: BaseException | None = None, timed_out: bool = False) -> Outcome:
    """ok (2xx) / rejected (4xx: the server refused, e.g. past its context) / crashed (5xx, a
    reset or refused connection, the server gone) / timed out."""
    if timed_out:
        return "timed_out"
    if status_code is not None and 200 <= status_code < 300 and error is None:
        return "ok"
    if status_code is not None and 400 <= status_code < 500:
        return "rejected"
    return "crashed"


def request_metrics(t: RequestTiming) -> dict[str, float | list[float] | None]:
    """TTFT, E2EL and TPOT in seconds, and the ITL gaps, for one ok request."""
    if t.outcome != "ok" or not t.text_chunk_times:
        return {"ttft": None, "e2el": None, "tpot": None, "itl": []}
    times = t.text_chunk_times
    ttft, e2el = times[0], times[-1]
    out = t.completion_tokens or 0
    tpot = (e2el - ttft) / (out - 1) if out > 1 else None
    return {"ttft": ttft, "e2el": e2el, "tpot": tpot, "itl": [b - a for a, b in zip(times, times[1:])]}


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of ``values_s`` (seconds) in milliseconds, as vllm bench serve names them."""
    if not values_s:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES))}
    ms = np.asarray(values_s) * 1000.0
    out: dict[str, float | None] = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def cell_summary(timings: list[RequestTiming], duration_s: float) -> dict[str, float | int | None]:
    """One cell of a campaign: counts per outcome, throughput over ``duration_s``, latency
    statistics, client-side prefill and decode tok/s, and whether the lengths came out as asked."""
    ok = [t for t in timings if t.outcome == "ok"]
    per = [request_metrics(t) for t in ok]
    ttfts = [m["ttft"] for m in per if m["ttft"] is not None]
    tpots = [m["tpot"] for m in per if m["tpot"] is not None]
    e2els = [m["e2el"] for m in per if m["e2el"] is not None]
    itls = [gap for m in per for gap in m["itl"]]
    total_in = sum(t.prompt_tokens or 0 for t in ok)
    total_out = sum(t.completion_tokens or 0 for t in ok)
    prefill = [(t.prompt_tokens or 0) / m["ttft"] for t, m in zip(ok, per) if m["ttft"]]
    mismatched = sum(
        1
        for t in ok
        if (t.requested_output_tokens is not None and t.completion_tokens != t.requested_output_tokens)
        or (t.requested_prompt_tokens is not None and t.prompt_tokens != t.requested_prompt_tokens)
    )
    summary: dict[str, float | int | None] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        **{outcome: sum(1 for t in timings if t.outcome == outcome) for outcome in ("rejected", "crashed", "timed_out")},
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": total_out / duration_s if duration_s > 0 else None,
        "total_token_throughput": (total_in + total_out) / duration_s if duration_s > 0 else None,
        **_stats("ttft", ttfts),
        **_stats("tpot", tpots),
        **_stats("itl", itls),
        **_stats("e2el", e2els),
        # per request, then averaged: prompt tokens over TTFT, and 1 / TPOT
        "prefill_tok_per_s": float(np.mean(prefill)) if prefill else None,
        "decode_tok_per_s": float(np.mean([1.0 / x for x in tpots if x > 0])) if tpots else None,
        "length_mismatches": mismatched,
    }
    return summary


def cell_status(summary: dict[str, float | int | None]) -> Outcome:
    """A cell's verdict: ok if every request was ok, else the worst thing that happened."""
    for outcome in ("crashed", "timed_out", "rejected"):
        if summary.get(outcome):
            return outcome  # type: ignore[return-value]
    return "ok"

"""Benchmark arithmetic for stress-test campaigns, defined the way `vllm bench serve` defines it.

Pure functions on timings a streaming client recorded, so every rule is unit-tested:

* TTFT: from sending the request to the first chunk that carries text. Open-loop cells count
  from the request's *scheduled* send time (``send_delay`` is added), so a client or a
  server that falls behind the schedule shows in the latency (no coordinated omission).
* E2EL: from sending (open loop: the scheduled time) to the last chunk with a token.
* TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token.
* ITL: the gaps between successive chunks with text.
* Throughput over the cell's wall time; mean, median, std and p50/p90/p99 of each latency.

Every figure a cell reports is a row of one table (``CELL_METRICS``, ``SERVER_METRICS``): its
name, unit and meaning, which way is better, and whether the nightly comparison and the
tables show it. The summary models, the CSV columns, the regression check and the report
are all derived from it, so a new metric is one row here plus the line that computes it.

Token counts come from the server's ``usage`` (not re-tokenised text). Key names match
``vllm bench serve --save-result`` where the metric is the same (``mean_ttft_ms``,
``p99_itl_ms``, ``output_throughput`` ...), so the two can be read side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from llmflow.engines.figures import SERVER_COUNTERS

Outcome = Literal["ok", "rejected", "crashed", "timed_out", "cancelled"]
PERCENTILES = (50, 90, 99)


class RequestTiming(BaseModel):
    """What the streaming client saw of one request (times in seconds from sending it)."""

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    chunk_times: list[float] = Field(
        default_factory=list,
        description="Arrival of each streamed chunk of a choice, with text or without (vllm bench serve's rule).",
    )
    prompt_tokens: int | None = Field(default=None, description="From the server's usage.")
    completion_tokens: int | None = Field(default=None, description="From the server's usage.")
    requested_prompt_tokens: int | None = None
    requested_output_tokens: int | None = None
    usage_source: Literal["server", "chunks"] | None = Field(
        default=None, description="server: from the stream's usage; chunks: counted text chunks (no usage sent)."
    )
    server_timings: dict[str, Any] | None = Field(
        default=None, description="llama-server's own timings of the request."
    )
    send_delay: float = Field(
        default=0.0, description="Seconds from the scheduled send time to the actual send (open loop; 0 closed loop)."
    )
    end_s: float | None = Field(default=None, description="When the request ended (any outcome), from sending.")


class SLO(BaseModel):
    """Service-level objectives of a cell; each stated limit applies per request (goodput) and
    to the cell's ``percentile`` of that latency (``slo_met``)."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(default=None, gt=0, description="Time to first token, from the scheduled send.")
    tpot_ms: float | None = Field(default=None, gt=0, description="Time per output token after the first.")
    e2el_ms: float | None = Field(default=None, gt=0, description="End-to-end latency, from the scheduled send.")
    percentile: float = Field(default=99, gt=0, le=100, description="The cell's percentile held to each limit.")

    def limits_s(self) -> dict[str, float]:
        """The stated limits in seconds, by latency name (ttft, tpot, e2el)."""
        return {
            name: value / 1000.0
            for name, value in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms))
            if value is not None
        }


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
    if t.outcome != "ok" or not t.chunk_times:
        return {"ttft": None, "e2el": None, "tpot": None, "itl": []}
    times = t.chunk_times
    ttft, e2el = t.send_delay + times[0], t.send_delay + times[-1]
    out = t.completion_tokens or 0
    tpot = (e2el - ttft) / (out - 1) if out > 1 else None
    return {"ttft": ttft, "e2el": e2el, "tpot": tpot, "itl": [b - a for a, b in zip(times, times[1:])]}


LATENCIES = ("ttft", "tpot", "itl", "e2el")  # per request (``<name>_s`` in request rows); stats per cell
LATENCY_STATS = ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES))


@dataclass(frozen=True)
class Metric:
    """One figure of a campaign cell: its key, unit, meaning, and how a change of it is judged.

    ``better`` says which way is good; ``regression`` puts it in the comparison with a baseline;
    ``column`` shows it in cells.csv, the table artifact and the report.
    """

    name: str
    unit: str
    description: str
    better: Literal["higher", "lower"] | None = None
    regression: bool = False
    column: bool = False
    value_type: type = float  # bool for a verdict (slo_met): shown, never compared by size


def _latency(name: str, what: str, compared: tuple[str, ...] = (), shown: tuple[str, ...] = ()) -> tuple[Metric, ...]:
    """``mean_<name>_ms`` ... ``p99_<name>_ms`` of a per-request latency."""
    return tuple(
        Metric(
            f"{stat}_{name}_ms",
            "ms",
            f"{stat} {what}",
            better=None if stat == "std" else "lower",
            regression=stat in compared,
            column=stat in shown,
        )
        for stat in LATENCY_STATS
    )


# The cell summary, in order; key names are vllm bench serve's where the metric is the same.
CELL_METRICS: tuple[Metric, ...] = (
    Metric(
        "duration",
        "s",
        "wall time of the timed requests, first send (open loop: the schedule's start) to last answer or the stop",
    ),
    Metric("completed", "requests", "requests answered in full", column=True, value_type=int),
    Metric("failed", "requests", "requests not answered in full", value_type=int),
    Metric("rejected", "requests", "requests the server refused (4xx)", value_type=int),
    Metric("crashed", "requests", "requests lost to a 5xx, a reset or a cut stream", value_type=int),
    Metric("timed_out", "requests", "requests with no byte within the request timeout", value_type=int),
    Metric("total_input_tokens", "tokens", "prompt tokens of the completed requests", value_type=int),
    Metric("total_output_tokens", "tokens", "completion tokens of the completed requests", value_type=int),
    Metric(
        "request_throughput", "req/s", "completed requests per second of duration", better="higher", regression=True
    ),
    Metric(
        "output_throughput",
        "tok/s",
        "completion tokens per second of duration",
        better="higher",
        regression=True,
        column=True,
    ),
    Metric("total_token_throughput", "tok/s", "prompt and completion tokens per second of duration", better="higher"),
    Metric("mean_in_flight", "requests", "requests in flight on average: sum of E2EL / duration", column=True),
    *_latency("ttft", "time to first token", compared=("mean", "p99"), shown=("mean", "p99")),
    *_latency("tpot", "time per output token after the first", compared=("mean",), shown=("mean",)),
    *_latency("itl", "gap between chunks with text", compared=("p99",), shown=("p99",)),
    *_latency("e2el", "end-to-end latency"),
    Metric(
        "prefill_tok_per_s",
        "tok/s",
        "prompt tokens over TTFT, pooled over requests",
        better="higher",
        regression=True,
        column=True,
    ),
    Metric(
        "decode_tok_per_s",
        "tok/s",
        "tokens after the first over E2EL - TTFT, pooled",
        better="higher",
        regression=True,
        column=True,
    ),
    Metric("cancelled", "requests", "requests cut off or never sent because the cell saturated", value_type=int),
    Metric("mean_send_delay_ms", "ms", "mean delay from a request's scheduled send to its send", better="lower"),
    Metric(
        "p99_send_delay_ms", "ms", "p99 delay from a request's scheduled send to its send", better="lower", column=True
    ),
    Metric(
        "request_goodput",
        "req/s",
        "requests that met every stated SLO, per second of duration",
        better="higher",
        column=True,
    ),
    Metric(
        "slo_met",
        "",
        "every request ok and the SLO percentile of each stated latency within its limit",
        column=True,
        value_type=bool,
    ),
    Metric(
        "length_mismatches",
        "requests",
        "completed requests whose prompt or completion length was not as asked",
        column=True,
        value_type=int,
    ),
    Metric(
        "client_cpu_s",
        "s",
        "CPU time (user + system) of the orchestrator's whole process over the timed requests: the client's share "
        "of the machine, with whatever else that process runs (Prefect's threads) counted in",
    ),
    Metric(
        "client_cpu_share",
        "CPUs",
        "client_cpu_s per second of duration: cores the client kept busy; on a machine it shares with the server, "
        "taken from the server",
        column=True,
    ),
)

# The server's own view of the cell (its counters, histograms or per-response timings).
SERVER_METRICS: tuple[Metric, ...] = (
    Metric("server_prompt_tokens", "tokens", "prompt tokens the server counted"),
    Metric("server_generation_tokens", "tokens", "tokens the server generated"),
    Metric("server_prefill_tok_per_s", "tok/s", "the server's prefill rate per sequence", better="higher", column=True),
    Metric("server_decode_tok_per_s", "tok/s", "the server's decode rate per sequence", better="higher", column=True),
    Metric("server_mean_ttft_ms", "ms", "the server's own mean time to first token", better="lower", column=True),
    Metric("server_cached_prompt_tokens", "tokens", "prompt tokens served from the prefix cache"),
)

METRICS: dict[str, Metric] = {m.name: m for m in (*CELL_METRICS, *SERVER_METRICS)}


def _model(name: str, metrics: tuple[Metric, ...], doc: str) -> type[BaseModel]:
    """A pydantic model with one optional field per metric: unknown keys are errors, so a
    misspelt metric fails loudly instead of reading as None."""
    fields: dict[str, Any] = {
        m.name: (m.value_type | None, Field(default=None, description=f"{m.description} ({m.unit})")) for m in metrics
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields)


CellSummary = _model("CellSummary", CELL_METRICS, "A campaign cell as the client measured it (CELL_METRICS).")
ServerFigures = _model("ServerFigures", SERVER_METRICS, "A campaign cell as the server measured it (SERVER_METRICS).")


def regression_metrics() -> list[Metric]:
    """The figures the nightly comparison checks, each with the way that is better."""
    return [m for m in METRICS.values() if m.regression]


def column_metrics() -> list[Metric]:
    """The figures shown per cell in cells.csv, the table artifact and the report."""
    return [m for m in METRICS.values() if m.column]


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of ``values_s`` (seconds) in milliseconds, as vllm bench serve names them."""
    if not values_s:
        return {f"{stat}_{name}_ms": None for stat in LATENCY_STATS}
    ms = np.asarray(values_s) * 1000.0
    out: dict[str, float | None] = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def is_good(m: dict[str, Any], limits_s: dict[str, float]) -> bool:
    """A request met every stated limit (``SLO.limits_s``), as ``vllm bench serve --goodput``
    judges it: a request with one output token has no TPOT and counts as TPOT 0."""
    for name, limit in limits_s.items():
        value = m.get(name)
        if value is None and name == "tpot":
            value = 0.0
        if value is None or value > limit:
            return False
    return True


def goodput(per: list[dict[str, Any]], slo: SLO | None, duration_s: float) -> float | None:
    """Requests per second of ``duration_s`` that met every stated SLO; ``per``: the
    ``request_metrics`` of the cell's ok requests. None without an SLO."""
    if slo is None or duration_s <= 0:
        return None
    limits = slo.limits_s()
    return sum(1 for m in per if is_good(m, limits)) / duration_s


def slo_met(timings: list[RequestTiming], slo: SLO | None) -> bool | None:
    """The cell met its SLO: every request ok, and the ``slo.percentile`` of each stated
    latency over them within its limit (TPOT over requests with more than one token). None
    without an SLO; False for a cell with no ok request."""
    if slo is None:
        return None
    if not timings or any(t.outcome != "ok" for t in timings):
        return False
    per = [request_metrics(t) for t in timings]
    for name, limit in slo.limits_s().items():
        values = [m[name] for m in per if m[name] is not None]
        if not values:
            if name == "tpot":
                continue
            return False
        if float(np.percentile(values, slo.percentile)) > limit:
            return False
    return True


def cell_summary(
    timings: list[RequestTiming], duration_s: float, slo: SLO | None = None, client_cpu_s: float | None = None
) -> CellSummary:
    """One cell of a campaign: counts per outcome, throughput over ``duration_s``, latency
    statistics, client-side prefill and decode tok/s, whether the lengths came out as asked,
    send delays, goodput against ``slo``, and the client's own CPU seconds (``client_cpu_s``,
    measured by the caller over the same timed part) and their share of the wall time.
    Requests ``cancelled`` (a saturated cell's cut ones) are counted apart, not as failed."""
    cancelled = [t for t in timings if t.outcome == "cancelled"]
    all_timings = timings
    timings = [t for t in timings if t.outcome != "cancelled"]
    ok = [t for t in timings if t.outcome == "ok"]
    per = [request_metrics(t) for t in ok]
    latencies = {
        name: [v for m in per for v in (m[name] if name == "itl" else [m[name]]) if v is not None] for name in LATENCIES
    }
    total_in = sum(t.prompt_tokens or 0 for t in ok)
    total_out = sum(t.completion_tokens or 0 for t in ok)
    # Pooled per-request rates: all prompt tokens over all TTFTs, all tokens after the first
    # over all time after the first token. A mean of per-request ratios would let one request
    # whose chunks arrived bunched (a near-zero TPOT) swamp the rest.
    prefill_time = sum(m["ttft"] for m in per if m["ttft"])
    prefill_tokens = sum(t.prompt_tokens or 0 for t, m in zip(ok, per) if m["ttft"])
    decode_time = sum(m["e2el"] - m["ttft"] for m in per if m["tpot"] is not None)
    decode_tokens = sum((t.completion_tokens or 0) - 1 for t, m in zip(ok, per) if m["tpot"] is not None)
    mismatched = sum(
        1
        for t in ok
        if (t.requested_output_tokens is not None and t.completion_tokens != t.requested_output_tokens)
        or (t.requested_prompt_tokens is not None and t.prompt_tokens != t.requested_prompt_tokens)
    )
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    # over every request sent, the cancelled ones in flight too: a saturated cell's delays
    delays_ms = [t.send_delay * 1000.0 for t in all_timings if t.outcome != "cancelled" or t.end_s is not None]
    return CellSummary(
        duration=duration_s,
        completed=len(ok),
        failed=len(timings) - len(ok),
        **{
            outcome: sum(1 for t in timings if t.outcome == outcome) for outcome in ("rejected", "crashed", "timed_out")
        },
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        mean_in_flight=per_s(sum(latencies["e2el"])),
        **{key: value for name in LATENCIES for key, value in _stats(name, latencies[name]).items()},
        prefill_tok_per_s=prefill_tokens / prefill_time if prefill_time > 0 else None,
        decode_tok_per_s=decode_tokens / decode_time if decode_time > 0 else None,
        length_mismatches=mismatched,
        cancelled=len(cancelled),
        mean_send_delay_ms=float(np.mean(delays_ms)) if delays_ms else None,
        p99_send_delay_ms=float(np.percentile(delays_ms, 99)) if delays_ms else None,
        request_goodput=goodput(per, slo, duration_s),
        slo_met=slo_met(all_timings, slo),
        client_cpu_s=client_cpu_s,
        client_cpu_share=client_cpu_s / duration_s if client_cpu_s is not None and duration_s > 0 else None,
    )


CellStatus = Literal["ok", "rejected", "crashed", "timed_out", "length_mismatch", "saturated", "skipped", "not_run"]


def cell_status(summary: CellSummary, saturated: bool = False) -> CellStatus:
    """A cell's verdict: the worst thing that happened to any request; ``length_mismatch`` when
    all were answered but some prompt or completion came out another length than asked (a
    context too small for prompt + output truncates the completion, for one). ``saturated``
    (an open-loop cell stopped by the saturation rule) outranks all but ``crashed``, which
    makes the campaign check the server."""
    if summary.crashed:
        return "crashed"
    if saturated:
        return "saturated"
    for outcome in ("timed_out", "rejected"):
        if getattr(summary, outcome):
            return outcome  # type: ignore[return-value]
    if summary.length_mismatches:
        return "length_mismatch"
    return "ok"


class Saturation(BaseModel):
    """When an open-loop cell stops early as ``saturated``: the server is not keeping up.

    Every ``window_s`` the client counts the requests that have fallen due (their scheduled
    send time passed) and those that have finished; the backlog is the difference (in flight,
    or waiting for a slot under the in-flight cap). The cell is saturated when, over the last
    ``windows`` windows, the server finished fewer than ``keep_up`` of the requests that fell
    due in them (throughput below ``keep_up`` x the offered rate, so the backlog, and with it
    the latency counted from the scheduled time, grows without bound) and the backlog is at
    least ``min_backlog``. Counts over several windows, not window by window, so a server that
    answers in batches (vLLM) is judged by its rate. ``windows`` 0 never stops a cell."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(default=1.0, gt=0, description="Seconds between counts.")
    windows: int = Field(default=5, ge=0, description="Windows the rate is judged over; 0: never stop a cell.")
    keep_up: float = Field(
        default=0.8, gt=0, le=1, description="Fraction of the requests falling due that must finish in the windows."
    )
    min_backlog: int = Field(default=16, ge=1, description="Backlog below which a cell is never saturated.")


def saturation_reason(counts: list[tuple[int, int]], rule: Saturation) -> str | None:
    """Why the cell is saturated, or None. ``counts``: (requests due, requests finished) so
    far, taken at the end of each window (``Saturation``), oldest first."""
    if rule.windows < 1 or len(counts) < rule.windows + 1:
        return None
    (due0, done0), (due, done) = counts[-(rule.windows + 1)], counts[-1]
    arrived, finished, backlog = due - due0, done - done0, due - done
    if backlog >= rule.min_backlog and arrived > 0 and finished < rule.keep_up * arrived:
        trail = " -> ".join(str(a - b) for a, b in counts[-(rule.windows + 1) :])
        return (
            f"saturated: {finished} of the {arrived} requests due in the last {rule.windows} x {rule.window_s:g} s "
            f"finished (under {rule.keep_up:g}); backlog {trail}"
        )
    return None


# Prometheus series a campaign reads before and after each cell: the token counters a batch
# reads, plus vLLM's prefill/decode/TTFT histograms (their _sum and _count).
BENCH_COUNTERS = {
    **SERVER_COUNTERS,
    "vllm:request_prefill_time_seconds_sum": "prefill_seconds",
    "vllm:request_decode_time_seconds_sum": "decode_seconds",
    "vllm:time_to_first_token_seconds_sum": "ttft_seconds",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
}


def _ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    return num / den * scale if num is not None and den else None


def server_figures(delta: dict[str, float] | None, timings: dict[str, float] | None) -> ServerFigures:
    """The server's own view of a cell, beside the client's: token counts from its counters,
    prefill and decode tok/s per sequence from its prefill/decode time (vLLM histograms) or
    from per-response ``timings`` (llama-server), and its mean TTFT where it measures one."""
    delta = delta or {}
    timings = timings or {}
    prefill = _ratio(delta.get("prompt_tokens"), delta.get("prefill_seconds")) or _ratio(
        timings.get("prompt_n"), timings.get("prompt_ms"), 1000.0
    )
    decode = _ratio(delta.get("generation_tokens"), delta.get("decode_seconds")) or _ratio(
        timings.get("predicted_n"), timings.get("predicted_ms"), 1000.0
    )
    return ServerFigures(
        server_prompt_tokens=delta.get("prompt_tokens"),
        server_generation_tokens=delta.get("generation_tokens"),
        server_prefill_tok_per_s=prefill,
        server_decode_tok_per_s=decode,
        server_mean_ttft_ms=_ratio(delta.get("ttft_seconds"), delta.get("ttft_count"), 1000.0),
        server_cached_prompt_tokens=timings.get("cache_n"),
    )

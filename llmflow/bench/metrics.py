"""Benchmark arithmetic for stress-test campaigns, defined the way `vllm bench serve` defines it.

Pure functions on timings a streaming client recorded, so every rule is unit-tested:

* TTFT: from sending the request to the first chunk that carries text.
* E2EL: from sending to the last chunk with a token.
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
    usage_source: Literal["server", "chunks"] | None = Field(
        default=None, description="server: from the stream's usage; chunks: counted text chunks (no usage sent)."
    )
    server_timings: dict[str, Any] | None = Field(
        default=None, description="llama-server's own timings of the request."
    )


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
    value_type: type = float


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
    Metric("duration", "s", "wall time of the timed requests, first send to last answer"),
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
    Metric(
        "length_mismatches",
        "requests",
        "completed requests whose prompt or completion length was not as asked",
        column=True,
        value_type=int,
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


def cell_summary(timings: list[RequestTiming], duration_s: float) -> CellSummary:
    """One cell of a campaign: counts per outcome, throughput over ``duration_s``, latency
    statistics, client-side prefill and decode tok/s, and whether the lengths came out as asked."""
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
    )


CellStatus = Literal["ok", "rejected", "crashed", "timed_out", "length_mismatch", "skipped", "not_run"]


def cell_status(summary: CellSummary) -> CellStatus:
    """A cell's verdict: the worst thing that happened to any request; ``length_mismatch`` when
    all were answered but some prompt or completion came out another length than asked (a
    context too small for prompt + output truncates the completion, for one)."""
    for outcome in ("crashed", "timed_out", "rejected"):
        if getattr(summary, outcome):
            return outcome  # type: ignore[return-value]
    if summary.length_mismatches:
        return "length_mismatch"
    return "ok"


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

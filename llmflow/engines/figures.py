"""What a server counts itself: Prometheus counters (vLLM, llama-server) and llama-server's
per-response ``timings``. Parsing and arithmetic are pure; ``read_counters`` is the one GET that
fetches the counters, for the batch and the campaign alike."""

from __future__ import annotations

from typing import Any

import httpx

from llmflow.auth import bearer

SERVER_COUNTERS = {
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "llamacpp:prompt_tokens_total": "prompt_tokens",  # llama-server --metrics
    "llamacpp:tokens_predicted_total": "generation_tokens",
}


def parse_prometheus_counters(text: str, names: dict[str, str] = SERVER_COUNTERS) -> dict[str, float]:
    """Sum each wanted counter over its label sets: ``name{labels} value`` lines of Prometheus text."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric, _, rest = line.partition(" ")
        name = metric.split("{", 1)[0]
        if name in names:
            try:
                value = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
            totals[names[name]] = totals.get(names[name], 0.0) + value
    return totals


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What the server counted during a pass; None when the engine reports nothing."""
    if before is None or after is None:
        return None
    return {key: after[key] - before.get(key, 0.0) for key in after}


TIMING_FIELDS = ("cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms")


def add_timings(sums: dict[str, float], timings: dict[str, Any]) -> None:
    """Add one response's ``timings`` (llama-server) to the running sums."""
    for name in TIMING_FIELDS:
        value = timings.get(name)
        if isinstance(value, (int, float)):
            sums[name] = sums.get(name, 0.0) + value


def timings_summary(sums: dict[str, float]) -> dict[str, float] | None:
    """Summed server timings plus the server's prefill and decode rate per sequence (tokens per
    second of its own processing time; with concurrent slots the aggregate rate is higher)."""
    if not sums:
        return None
    out = {name: round(value, 3) for name, value in sums.items()}
    if sums.get("prompt_ms"):
        out["prefill_tok_per_s"] = round(sums.get("prompt_n", 0.0) / sums["prompt_ms"] * 1000, 3)
    if sums.get("predicted_ms"):
        out["decode_tok_per_s"] = round(sums.get("predicted_n", 0.0) / sums["predicted_ms"] * 1000, 3)
    return out


def read_counters(
    metrics_path: str | None, base_url: str, api_key: str | None, names: dict[str, str] = SERVER_COUNTERS
) -> dict[str, float] | None:
    """The server's counters now (``names``: Prometheus series to read), or None when it
    publishes none (``metrics_path`` None) or they cannot be read."""
    if metrics_path is None:
        return None
    try:
        resp = httpx.get(base_url + metrics_path, headers=bearer(api_key), timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_prometheus_counters(resp.text, names)

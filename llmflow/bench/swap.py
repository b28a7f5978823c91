"""What a model swap costs on a llama-server router: before a cell of a campaign that lists
models, the router is asked whether the cell's model is loaded; if not, a 1-token streamed
probe is sent first and its TTFT is the swap sample (the router evicts the least recently used
model when full, then loads this one, then answers), and the same probe sent again at once is
the warm figure it is compared with. The probe goes before the cell's prompts are measured,
as measuring them (``/tokenize`` names the model) would load the model itself."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
from pydantic import BaseModel, Field

from llmflow.aio import run_sync
from llmflow.bench.metrics import request_metrics
from llmflow.bench.stream import StreamRequest, completion_body, run_requests
from llmflow.router import LOADED, parse_models


class SwapProbe(BaseModel):
    """The probe's findings for one cell."""

    state: str | None = Field(description="The model's status before the cell; None when the router did not say.")
    swap_ttft_ms: float | None = Field(default=None, description="TTFT of the first request, model not loaded.")
    warm_ttft_ms: float | None = Field(default=None, description="TTFT of the same request again, model loaded.")
    error: str | None = Field(default=None, description="Why a probe got no first token.")


def model_state(payload: Any, model: str) -> str | None:
    """``model``'s status in the router's ``/v1/models`` answer; None when it is not listed."""
    return next((s.status for s in parse_models(payload) if s.model == model), None)


def probe_ttft_ms(base_url: str, api_key: str | None, model: str, fixed: dict[str, Any], timeout_s: float) -> float:
    """TTFT in ms of one short streamed completion naming ``model``; ``RuntimeError`` with the
    request's error when it got no first token."""
    fields = {**fixed, "max_tokens": 1}
    uid = secrets.token_hex(4)
    request = StreamRequest(uid, completion_body(model, f"{uid}: swap probe", fields), 0, 1)
    [(_, timing)], _ = run_sync(lambda: run_requests(base_url, api_key, [request], 1, timeout_s))
    ttft = request_metrics(timing)["ttft"]
    if ttft is None:
        raise RuntimeError(timing.error or f"probe ended {timing.outcome}")
    return round(1000.0 * float(ttft), 3)  # type: ignore[arg-type]


def probe_swap(
    client: httpx.Client,
    base_url: str,
    api_key: str | None,
    model: str,
    fixed: dict[str, Any],
    timeout_s: float,
) -> SwapProbe:
    """The model's state; when it is not loaded, the swap's TTFT and the warm one after it.

    ``client`` should keep no connection alive (the campaign's router cells use such a client):
    the router's load that follows can end an idle kept-alive connection, and the cell's next
    request on it would fail as if the server had gone (seen with models_max 1)."""
    try:
        resp = client.get("/v1/models")
        resp.raise_for_status()
        state = model_state(resp.json(), model)
    except (httpx.HTTPError, ValueError) as exc:
        return SwapProbe(state=None, error=f"GET /v1/models: {type(exc).__name__}: {exc}"[:300])
    if state == LOADED:
        return SwapProbe(state=state)
    found = SwapProbe(state=state)
    try:
        found.swap_ttft_ms = probe_ttft_ms(base_url, api_key, model, fixed, timeout_s)
        found.warm_ttft_ms = probe_ttft_ms(base_url, api_key, model, fixed, timeout_s)
    except RuntimeError as exc:
        found.error = f"{'warm' if found.swap_ttft_ms is not None else 'swap'} probe: {exc}"[:300]
    return found

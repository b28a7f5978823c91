"""Is the server really answering? One probe for the health gate, the hold session and the campaign.

"Ready" means the engine's readiness signal is up (``probe``) *and*, for the gate, a one-token
completion succeeds: some servers open their port (or answer /v1/models) before they can
generate. ``answers`` is the single probe a running session uses to tell a server that still
serves from one that has gone quiet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import httpx

from llmflow import engines
from llmflow.errors import GateFailed
from llmflow.placements import driver_for
from llmflow.results import Ready, ServerHandle

LOADING_STATUSES = {502, 503, 504}
ProbeState = Literal["ready", "loading", "fatal"]


def classify(status: int | None) -> ProbeState:
    """Map one readiness probe to ``ready`` / ``loading`` / ``fatal``. ``None`` = no connection yet."""
    if status is None or status in LOADING_STATUSES:
        return "loading"
    if 200 <= status < 300:
        return "ready"
    if status == 404:
        return "loading"  # some servers mount routes only after start-up
    return "fatal"


def probe(client: httpx.Client, path: str) -> tuple[ProbeState, httpx.Response | None]:
    """One GET of the engine's readiness path, classified; the response when there was one."""
    try:
        resp = client.get(path)
    except httpx.TransportError:
        return "loading", None
    return classify(resp.status_code), resp


def answers(base_url: str, handle: ServerHandle, engine: Any, timeout_s: float = 10.0) -> bool:
    """Whether the server behind ``base_url`` answers its readiness path now."""
    with httpx.Client(base_url=base_url, headers=handle.auth_headers(), timeout=timeout_s) as client:
        state, _ = probe(client, engines.spec_for(engine).readiness_path)
    return state == "ready"


def _models(client: httpx.Client) -> list[str]:
    """Model ids the server lists, for the record (the readiness path may be /health, with no body)."""
    try:
        return [m.get("id", "") for m in client.get("/v1/models").json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return []


def wait_ready(
    base_url: str,
    handle: ServerHandle,
    engine: Any,
    *,
    deadline_s: float,
    interval_s: float,
    check_alive: Callable[[], None],
) -> Ready:
    """Poll until ready; ``check_alive`` raises as soon as the process or job is gone."""
    path = engines.spec_for(engine).readiness_path
    started = time.monotonic()
    polls = 0
    timeout = httpx.Timeout(10.0, read=60.0)
    with httpx.Client(base_url=base_url, headers=handle.auth_headers(), timeout=timeout) as client:
        while True:
            check_alive()
            polls += 1
            state, resp = probe(client, path)
            if state == "fatal":
                raise GateFailed(f"GET {path} answered {resp.status_code}: {resp.text[:300]}")  # type: ignore[union-attr]
            if state == "ready":
                test = client.post(
                    "/v1/completions", json={"model": handle.served_name, "prompt": "ping", "max_tokens": 1}
                )
                if test.status_code == 200:
                    return Ready(
                        seconds_to_ready=round(time.monotonic() - started, 3), polls=polls, models=_models(client)
                    )
                if classify(test.status_code) == "fatal":
                    raise GateFailed(f"test completion answered {test.status_code}: {test.text[:300]}")
            if time.monotonic() - started > deadline_s:
                status = resp.status_code if resp is not None else None
                raise TimeoutError(
                    f"server not ready after {deadline_s:.0f}s ({polls} polls of {path}, last status {status})"
                )
            time.sleep(interval_s)


def gate_server(config: Any, handle: ServerHandle, base_url: str) -> Ready:
    """``wait_ready`` with the session's settings, watching the handle's process or job."""
    driver = driver_for(config)
    return wait_ready(
        base_url,
        handle,
        config.engine,
        deadline_s=config.gate.deadline_s,
        interval_s=config.gate.interval_s,
        check_alive=lambda: driver.check_alive(handle),
    )

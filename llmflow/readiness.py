"""Health gate: wait until the server really answers, while watching that it is alive.

"Ready" means the engine's readiness signal is up *and* a one-token completion succeeds:
some servers open their port (or answer /v1/models) before they can generate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from llmflow import engines
from llmflow.results import Ready

LOADING_STATUSES = {502, 503, 504}


class GateFailed(RuntimeError):
    """The server answered in a way that waiting will not fix (wrong key, bad request)."""


def classify(status: int | None) -> str:
    """Map one readiness probe to ``ready`` / ``loading`` / ``fatal``. ``None`` = no connection yet."""
    if status is None or status in LOADING_STATUSES:
        return "loading"
    if 200 <= status < 300:
        return "ready"
    if status == 404:
        return "loading"  # some servers mount routes only after start-up
    return "fatal"


def _models(client: httpx.Client) -> list[str]:
    """Model ids the server lists, for the record (the readiness path may be /health, with no body)."""
    try:
        return [m.get("id", "") for m in client.get("/v1/models").json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return []


def wait_ready(
    base_url: str,
    api_key: str | None,
    engine: Any,
    served_name: str,
    *,
    deadline_s: float,
    interval_s: float,
    check_alive: Callable[[], None],
) -> Ready:
    """Poll until ready; ``check_alive`` raises as soon as the process or job is gone."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = engines.spec_for(engine).readiness_path
    started = time.monotonic()
    polls = 0
    with httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        while True:
            check_alive()
            polls += 1
            try:
                resp = client.get(path)
                status: int | None = resp.status_code
            except httpx.TransportError:
                status, resp = None, None
            state = classify(status)
            if state == "fatal":
                raise GateFailed(f"GET {path} answered {status}: {resp.text[:300] if resp is not None else ''}")
            if state == "ready":
                probe = client.post(
                    "/v1/completions", json={"model": served_name, "prompt": "ping", "max_tokens": 1}
                )
                if probe.status_code == 200:
                    return Ready(seconds_to_ready=round(time.monotonic() - started, 3), polls=polls, models=_models(client))
                if classify(probe.status_code) == "fatal":
                    raise GateFailed(f"test completion answered {probe.status_code}: {probe.text[:300]}")
            if time.monotonic() - started > deadline_s:
                raise TimeoutError(f"server not ready after {deadline_s:.0f}s ({polls} polls of {path}, last status {status})")
            time.sleep(interval_s)


def gate_server(config: Any, handle: Any, base_url: str) -> Ready:
    """``wait_ready`` with the session's settings, watching the handle's process or job."""
    from llmflow.placements import driver_for  # placements import this module's callers

    driver = driver_for(config)
    return wait_ready(
        base_url,
        handle.api_key(),
        config.engine,
        handle.served_name,
        deadline_s=config.gate.deadline_s,
        interval_s=config.gate.interval_s,
        check_alive=lambda: driver.check_alive(handle),
    )

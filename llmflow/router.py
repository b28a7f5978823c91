"""llama-server's router mode, as data: which models it can serve, what state each is in, and
how often each was loaded and evicted. Pure: JSON, event lines and log text in, figures out.

Where loads and evictions are counted from: the router's ``/models/sse`` stream. The router
sends an event for every state change of every model (``loading``, ``loaded``, ``unloaded``
with the child's exit code) to each subscriber registered before the change, so a listener
that subscribes before the batch sees every cycle, however fast. Polling ``/models`` cannot
promise that: a model loaded and evicted between two polls is never seen. The router's log
says the same thing in words (``spawning server instance with name=X``, ``evicting idle LRU
name=X``); ``log_counts`` reads it, for the tests that check one against the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

LOADED = "loaded"
LOADING = "loading"
UNLOADED = "unloaded"


def is_router(engine: Any) -> bool:
    """Whether the session's engine is llama-server in router mode (``engine.router`` set)."""
    return getattr(engine, "kind", None) == "llama_server" and getattr(engine, "router", None) is not None


class ModelState(BaseModel):
    """One model as the router lists it (``GET /models``, ``/v1/models``)."""

    model: str = Field(description="The name requests use (a models folder's file stem, or a preset's section).")
    status: str = Field(description="unloaded, loading, loaded, sleeping ... as the router says.")
    failed: bool = Field(default=False, description="Its last load ended with the child exiting non-zero.")
    exit_code: int | None = Field(default=None, description="The child's exit code when it failed.")


def parse_models(payload: Any) -> list[ModelState]:
    """The router's model list. A single-model server's list (no ``status``) reads as loaded."""
    data = payload.get("data", []) if isinstance(payload, dict) else []
    states = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        status = item.get("status")
        status = status if isinstance(status, dict) else {"value": LOADED}
        states.append(
            ModelState(
                model=item["id"],
                status=str(status.get("value", LOADED)),
                failed=bool(status.get("failed", False)),
                exit_code=status.get("exit_code"),
            )
        )
    return states


class RouterEvent(BaseModel):
    """One state change the router announced on ``/models/sse``."""

    model: str
    status: str
    exit_code: int | None = None
    at_s: float | None = Field(default=None, description="When the listener received it (its own clock).")


def parse_event(line: str, at_s: float | None = None) -> RouterEvent | None:
    """A ``data: {...}`` line of the stream as a state change; None for anything else (blank
    lines, keep-alives, download progress, a ``loading`` progress tick is still ``loading``)."""
    if not line.startswith("data:"):
        return None
    try:
        item = json.loads(line[len("data:") :])
    except ValueError:
        return None
    if not isinstance(item, dict) or item.get("event") not in ("status_change", "model_status"):
        return None
    data = item.get("data") if isinstance(item.get("data"), dict) else {}
    if not isinstance(item.get("model"), str) or not isinstance(data.get("status"), str):
        return None
    return RouterEvent(model=item["model"], status=data["status"], exit_code=data.get("exit_code"), at_s=at_s)


class LoadCounts(BaseModel):
    """How often the router loaded and unloaded one model."""

    loads: int = Field(default=0, description="Loads that completed (the model became loaded).")
    evictions: int = Field(
        default=0,
        description="Times a loaded model was unloaded: to make room (models_max), or on request.",
    )
    forced_evictions: int = Field(
        default=0,
        description=(
            "Of the evictions, those whose child exited non-zero: it did not stop within the router's stop "
            "timeout and was killed (or it crashed while loaded)."
        ),
    )
    failed_loads: int = Field(default=0, description="Loads that ended with the child exiting non-zero.")
    load_s: float = Field(
        default=0.0, description="Seconds from the router's 'loading' to 'loaded', summed over the timed loads."
    )
    timed_loads: int = Field(default=0, description="Loads whose start and end the listener both saw.")

    @property
    def load_s_mean(self) -> float | None:
        """What one load cost on average: the price of a swap. None when no load was timed."""
        return round(self.load_s / self.timed_loads, 4) if self.timed_loads else None


def count_cycles(events: Iterable[RouterEvent]) -> dict[str, LoadCounts]:
    """Loads and evictions per model from the router's state changes, in the order received.

    A load counts when the model becomes ``loaded`` (repeated ``loaded`` events without an unload
    between count once). An ``unloaded`` after ``loaded`` is an eviction whatever the exit code:
    the router kills a child that ignores its stop command for the stop timeout (10 s), and that
    child exits 1 (a *forced* eviction). An ``unloaded`` with a non-zero exit code that did not
    follow ``loaded`` is a failed load."""
    counts: dict[str, LoadCounts] = {}
    last: dict[str, str] = {}
    loading_since: dict[str, float] = {}
    for event in events:
        count = counts.setdefault(event.model, LoadCounts())
        before = last.get(event.model)
        if event.status == LOADING and before != LOADING and event.at_s is not None:
            loading_since[event.model] = event.at_s
        if event.status == LOADED and before != LOADED:
            count.loads += 1
            if (
                before == LOADING
                and event.at_s is not None
                and (since := loading_since.pop(event.model, None)) is not None
            ):
                count.load_s += event.at_s - since
                count.timed_loads += 1
        elif event.status == UNLOADED and before != UNLOADED:
            if before == LOADED or (before is None and not event.exit_code):  # None: loaded before we listened
                count.evictions += 1
                count.forced_evictions += bool(event.exit_code)
            elif event.exit_code:
                count.failed_loads += 1
        last[event.model] = event.status
    return counts


_NOT_RUNNING = re.compile(r"model name=\S+ is not running")


def swapped_out(status: int, body: Any) -> bool:
    """The router's 400 "model name=X is not running": X was loaded for this request but evicted
    for another queued one before the request reached it (models_max 1 under concurrency). Not
    the line's answer: the same request succeeds when sent again."""
    if status != 400 or not isinstance(body, dict):
        return False
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and bool(_NOT_RUNNING.fullmatch(message))


_CHILD_LINE = re.compile(r"^\[\d+\]")  # the children's own log lines, prefixed with [port]
_LOAD = re.compile(r"spawning server instance with name=(\S+) on port")
_EVICT = re.compile(r"(?:evicting idle LRU|models_max limit reached, removing LRU) name=(\S+)")


def log_counts(text: str) -> dict[str, LoadCounts]:
    """Loads started and evictions per model, as the router's own log words them (``load:
    spawning server instance with name=X on port P``; ``tick: evicting idle LRU name=X for a
    queued request`` or ``models_max limit reached, removing LRU name=X``)."""
    counts: dict[str, LoadCounts] = {}
    for line in text.splitlines():
        if _CHILD_LINE.match(line):
            continue
        if match := _LOAD.search(line):
            counts.setdefault(match.group(1), LoadCounts()).loads += 1
        elif match := _EVICT.search(line):
            counts.setdefault(match.group(1), LoadCounts()).evictions += 1
    return counts

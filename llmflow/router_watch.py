"""Listen to a llama-server router's ``/models/sse`` while a batch or a campaign runs, so every
load and eviction is counted (``llmflow.router`` says why this stream and not polling)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from llmflow.auth import bearer
from llmflow.router import LoadCounts, RouterEvent, count_cycles, parse_event


class RouterWatch:
    """A background thread holding the router's event stream open; ``start`` returns once the
    router has answered the subscription (the router registers a subscriber before it answers),
    so no change after ``start`` is missed. Use as a context manager."""

    def __init__(self, base_url: str, api_key: str | None, connect_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = bearer(api_key)
        self.connect_timeout_s = connect_timeout_s
        self.events: list[RouterEvent] = []
        self.error: str | None = None
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._listen, name="llmflow-router-watch", daemon=True)
        self.t0 = time.monotonic()

    def _listen(self) -> None:
        """The stream in an event loop of its own: cancelling its task ends a blocked read at
        once (a blocking read in a plain thread cannot be interrupted)."""
        self._loop = asyncio.new_event_loop()
        try:
            self._task = self._loop.create_task(self._read())
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._subscribed.set()
            self._loop.close()

    async def _read(self) -> None:
        timeout = httpx.Timeout(self.connect_timeout_s, read=None)
        try:
            async with httpx.AsyncClient(headers=self.headers, timeout=timeout) as client:
                async with client.stream("GET", self.base_url + "/models/sse") as resp:
                    if resp.status_code != 200:
                        self.error = f"GET /models/sse answered {resp.status_code}"
                        return
                    self._subscribed.set()
                    async for line in resp.aiter_lines():
                        if (event := parse_event(line, time.monotonic() - self.t0)) is not None:
                            self.events.append(event)
            self.error = "/models/sse: the router closed the stream"
        except httpx.HTTPError as exc:
            self.error = f"/models/sse: {type(exc).__name__}: {exc}"

    def start(self) -> RouterWatch:
        self._thread.start()
        self._subscribed.wait(self.connect_timeout_s)
        return self

    def stop(self, settle_s: float = 0.2) -> None:
        """Stop listening; ``settle_s`` first, for the last events of a pass to arrive."""
        time.sleep(settle_s)
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop ended in between
                pass
        self._thread.join(timeout=5.0)

    def counts(self) -> dict[str, LoadCounts] | None:
        """Loads and evictions per model seen so far; None when the stream could not be held
        (an older llama-server without ``/models/sse``): unknown, not zero."""
        if self.error is not None:
            return None
        return count_cycles(self.events)

    def __enter__(self) -> RouterWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

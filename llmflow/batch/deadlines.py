"""The batch client's read timeout: one sweep for every request in flight, not a timer each.

aiohttp's ``sock_read`` re-arms a timer on every chunk it receives; against a server that
answers at once that cost the batch client about 9% of its requests per second, and
``asyncio.timeout`` or any async context manager around each request cost 3-9% too
(``benchmarks/tunnel_throughput.py``, batch client against the bare aiohttp loop). A batch's
answers are not streamed, so the time to the answer's bytes is the time to the whole answer:
a sweep every ``limit_s / 4`` (at most every second) cancels a request still waiting after
``limit_s``, and ``timed_out`` tells that cancellation from any other.

Use, around one request in the task that sends it::

    deadlines.begin(task)
    try:
        ...  # the request
    except asyncio.CancelledError:
        if deadlines.timed_out(task):
            ...  # a read timeout
        raise
    finally:
        deadlines.end(task)
"""

from __future__ import annotations

import asyncio


class ReadDeadlines:
    """Requests in flight, by the task sending each, and when each was sent."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.interval_s = min(1.0, limit_s / 4)
        self._sent: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._cancelling: dict[asyncio.Task[object], int] = {}  # a task's cancel requests before its request
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def begin(self, task: asyncio.Task[object]) -> None:
        """``task`` sends a request now."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._sent[task] = self._loop.time()
        if cancelling := task.cancelling():  # almost never: a request sent by a task being cancelled
            self._cancelling[task] = cancelling
        if self._sweep is None:
            self._sweep = self._loop.call_later(self.interval_s, self._expire)

    def end(self, task: asyncio.Task[object]) -> None:
        """``task``'s request is over, whichever way."""
        self._sent.pop(task, None)
        self._expired.discard(task)
        if self._cancelling:
            self._cancelling.pop(task, None)

    def timed_out(self, task: asyncio.Task[object]) -> bool:
        """Whether the ``CancelledError`` in ``task`` was the read timeout's, and only that:
        a cancellation from elsewhere (the pass being stopped) stays a cancellation."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= self._cancelling.get(task, 0)

    def _expire(self) -> None:
        """Cancel what waited too long; sweep again while anything is in flight."""
        assert self._loop is not None
        oldest_allowed = self._loop.time() - self.limit_s
        for task, sent in list(self._sent.items()):
            if sent <= oldest_allowed:
                del self._sent[task]
                self._expired.add(task)
                task.cancel()
        self._sweep = self._loop.call_later(self.interval_s, self._expire) if self._sent else None

    def close(self) -> None:
        """Stop sweeping (the sender is closed)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

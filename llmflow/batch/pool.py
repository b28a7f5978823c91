"""Where each request of a batch goes: one endpoint, or the ready replicas of a session.

The pool hands a request the ready endpoint with the fewest requests outstanding (least
outstanding first, as nginx's ``least_conn``), waits while none is ready (the first replica
may still be loading), and lets replicas come and go while the batch runs:

* ``add`` puts a replica in once it passed its health gate;
* ``suspect`` takes one out of rotation after connection errors and asks the watcher (the
  replica set) to look at it; the watcher calls ``restore`` (it was a hiccup) or ``remove``
  (it is gone; a replacement will be added when ready);
* ``close`` ends the waiting with ``NoReplicaLeft`` when no replica will come any more.

Everything here runs on the batch's event loop; the replica set, which lives in other threads,
calls in with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

EndpointState = Literal["ready", "suspect", "gone"]
SUSPECT_AFTER = 2  # connection errors in a row on one endpoint before it is taken out of rotation


class NoReplicaLeft(Exception):
    """No endpoint is ready and none will be: every replica was lost and none can replace it."""


@dataclass
class Endpoint:
    """One server the batch sends to, and what it did for this pass."""

    name: str
    base_url: str
    sender: Any  # a batch.client Sender
    state: EndpointState = "ready"
    outstanding: int = 0
    errors_in_a_row: int = 0
    answered: int = 0
    succeeded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    moved_away: int = 0
    first_sent: float | None = None
    last_answer: float | None = None

    def figures(self) -> dict[str, Any]:
        busy = (self.last_answer - self.first_sent) if self.first_sent and self.last_answer else None
        return {
            "name": self.name,
            "answered": self.answered,
            "succeeded": self.succeeded,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "moved_away": self.moved_away,
            "busy_s": round(busy, 3) if busy else None,
            "output_tok_per_s": round(self.completion_tokens / busy, 2) if busy else None,
        }


class Watcher(Protocol):
    """What the pool tells about its endpoints (the replica set implements it)."""

    def suspect(self, name: str) -> None: ...


@dataclass
class EndpointPool:
    """The endpoints of one batch pass; see the module docstring."""

    make_sender: Callable[[str, str | None], Any]
    watcher: Watcher | None = None
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    closed: str | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _retired: list[Any] = field(default_factory=list)  # senders of replaced endpoints, closed with the pool

    # -- membership (the replica set calls these on the loop) ---------------------------------
    def add(self, name: str, base_url: str, api_key: str | None) -> None:
        old = self.endpoints.get(name)
        if old is not None and old.base_url == base_url:
            old.state, old.errors_in_a_row = "ready", 0
        else:
            if old is not None:  # its requests in flight still use its sender: close it with the pool
                self._retired.append(old.sender)
            self.endpoints[name] = Endpoint(name, base_url, self.make_sender(base_url, api_key))
        self._changed.set()

    def restore(self, name: str) -> None:
        if (ep := self.endpoints.get(name)) is not None and ep.state == "suspect":
            ep.state, ep.errors_in_a_row = "ready", 0
            self._changed.set()

    def remove(self, name: str) -> None:
        if (ep := self.endpoints.get(name)) is not None:
            ep.state = "gone"

    def close(self, reason: str) -> None:
        self.closed = reason
        self._changed.set()

    # -- the batch's side ---------------------------------------------------------------------
    @property
    def replicated(self) -> bool:
        """Whether a failing endpoint can be taken out of rotation (someone watches it)."""
        return self.watcher is not None

    async def acquire(self) -> Endpoint:
        """The ready endpoint with the fewest outstanding requests; waits while none is ready."""
        while True:
            ready = [ep for ep in self.endpoints.values() if ep.state == "ready"]
            if ready:
                ep = min(ready, key=lambda e: e.outstanding)
                ep.outstanding += 1
                if ep.first_sent is None:
                    ep.first_sent = time.perf_counter()
                return ep
            if self.closed is not None:
                raise NoReplicaLeft(self.closed)
            self._changed.clear()
            await self._changed.wait()

    def release(self, ep: Endpoint) -> None:
        ep.outstanding -= 1

    def answered(self, ep: Endpoint, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        ep.errors_in_a_row = 0
        ep.answered += 1
        ep.last_answer = time.perf_counter()
        if ok:
            ep.succeeded += 1
            ep.prompt_tokens += prompt_tokens
            ep.completion_tokens += completion_tokens

    def connection_failed(self, ep: Endpoint) -> bool:
        """Count a connection error; True when the request should move to another replica now.

        With a watcher, a request that could not reach its replica moves at once (no backoff, no
        attempt used up), and a replica that failed ``SUSPECT_AFTER`` times in a row is taken
        out of rotation until the watcher has looked at it.
        """
        if self.watcher is None:
            return False
        ep.errors_in_a_row += 1
        ep.moved_away += 1
        if ep.state == "ready" and ep.errors_in_a_row >= SUSPECT_AFTER:
            ep.state = "suspect"
            self.watcher.suspect(ep.name)
        return True

    async def aclose(self) -> None:
        for sender in [*self._retired, *(ep.sender for ep in self.endpoints.values())]:
            await sender.aclose()

    def figures(self) -> list[dict[str, Any]]:
        return [ep.figures() for ep in self.endpoints.values()]

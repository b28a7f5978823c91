"""Progress of a running batch, fanned out to whoever listens (the CLI's bar, Prefect's artifact).

Listeners are process-local callables ``(finished, total)``; the CLI registers a terminal bar
before it calls the flow, and the batch task adds a Prefect progress artifact of its own.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
_listeners: list[ProgressFn] = []


def add_listener(fn: ProgressFn) -> None:
    _listeners.append(fn)


def remove_listener(fn: ProgressFn) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def publish(finished: int, total: int) -> None:
    for fn in list(_listeners):
        fn(finished, total)

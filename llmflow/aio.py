"""Run a coroutine to completion from synchronous code, with signals still reaching us.

The event loop runs in a helper thread; the calling thread only waits (and ticks). Signals
are handled in the main thread, so whatever handler is installed raises *here*: Ctrl-C's
KeyboardInterrupt, and Prefect's SIGTERM bridge, which also tells a cancellation from the
UI/API (the run ends Cancelled) from any other termination (Crashed). Raised inside the
event loop instead, such an exception lands in some socket callback, where asyncio logs and
swallows it and the work goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]], tick: Callable[[], None] | None = None, name: str = "llmflow-loop") -> T:
    """Await ``make()`` in a helper thread's loop; call ``tick`` on this thread every 0.2 s.

    On any exception here (a signal, say) the coroutine is cancelled, its cleanup gets up to a
    minute, and the exception propagates.
    """
    finished = threading.Event()

    async def main() -> T:
        try:
            return await make()
        finally:
            finished.set()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(main(), loop)
    try:
        while not finished.wait(0.2):
            if tick:
                tick()
        if tick:
            tick()
        return future.result()
    except BaseException:
        future.cancel()
        finished.wait(60)
        raise
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()

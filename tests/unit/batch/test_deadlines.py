"""ReadDeadlines: one sweep times out the requests that waited too long, and only those."""

from __future__ import annotations

import asyncio

import pytest

from llmflow.batch.deadlines import ReadDeadlines


async def _request(deadlines: ReadDeadlines, wait_s: float) -> str:
    """What a sender does around one request: a read timeout becomes 'timeout'."""
    task = asyncio.current_task()
    assert task is not None
    deadlines.begin(task)
    try:
        await asyncio.sleep(wait_s)
        return "answered"
    except asyncio.CancelledError:
        if deadlines.timed_out(task):
            return "timeout"
        raise
    finally:
        deadlines.end(task)


def test_only_the_requests_past_the_limit_time_out_and_the_sweep_stops_when_idle():
    async def scenario() -> tuple[list[str], float, bool]:
        deadlines = ReadDeadlines(0.2)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(_request(deadlines, s) for s in (0.01, 0.1, 5.0, 5.0)))
        took = asyncio.get_running_loop().time() - started
        await asyncio.sleep(2 * deadlines.interval_s)  # one more sweep finds nothing in flight
        return results, took, deadlines._sweep is None

    results, took, idle = asyncio.run(scenario())
    assert results == ["answered", "answered", "timeout", "timeout"]
    assert 0.2 <= took < 2.0  # after the limit, well before the 5 s answers (a sweep every 0.05 s)
    assert idle


def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    async def scenario() -> None:
        deadlines = ReadDeadlines(10.0)
        task = asyncio.create_task(_request(deadlines, 5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario())


def test_a_task_timed_out_once_sends_again_with_a_fresh_deadline():
    async def scenario() -> list[str]:
        deadlines = ReadDeadlines(0.2)
        first = await _request(deadlines, 1.0)
        second = await _request(deadlines, 0.05)  # same task, next attempt: not cancelled again
        deadlines.close()
        return [first, second, str(asyncio.current_task().cancelling())]

    assert asyncio.run(scenario()) == ["timeout", "answered", "0"]


def test_a_timeout_in_a_task_that_already_carried_a_cancel_request_is_still_a_timeout():
    """The sweep's cancellation is told apart by the count of cancel requests the task had when
    its request began, not by a count of zero (as ``asyncio.timeout`` does it)."""

    async def scenario() -> tuple[str, int]:
        deadlines = ReadDeadlines(0.1)
        task = asyncio.current_task()
        task.cancel()  # a cancel request the task has not seen yet...
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # ...seen and swallowed, but still counted: cancelling() == 1
        result = await _request(deadlines, 1.0)
        return result, task.cancelling()

    assert asyncio.run(scenario()) == ("timeout", 1)

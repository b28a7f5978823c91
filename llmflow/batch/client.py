"""The batch client: stream an OpenAI batch file through an endpoint, bounded concurrency.

Hot path per request: one POST, one JSON parse (for ``usage``), one JSON line appended.
Retries (exponential backoff with jitter) on timeouts, connection errors and 5xx; a 4xx is
final and is written as it came, and so is a 5xx still given on the last attempt (the server's
answer to that line, such as a 500 for a parameter it cannot handle), except 502/503/504: a
gateway or a server that is not ready cannot answer for the line, which stays unfinished. The retry loop is a few lines here rather than tenacity:
tenacity's per-call set-up cost a third of the client's throughput against a fast server. Two transports behind one small interface: ``aiohttp``
(the default, chosen by measurement: see benchmarks/client_throughput.py) and ``httpx``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp
import httpx

from llmflow.aio import run_sync
from llmflow.auth import bearer
from llmflow.batch.by_model import NO_MODEL, BatchReportByModel, ModelTally, model_figures
from llmflow.batch.deadlines import ReadDeadlines
from llmflow.batch.jsonl import (
    EMBEDDINGS_URL,
    JsonlAppender,
    count_lines,
    errors_path_for,
    load_finished,
    output_line,
    parse_lines,
)
from llmflow.batch.pool import Endpoint, EndpointPool, NoReplicaLeft, Watcher
from llmflow.config import BatchConfig, Timeouts
from llmflow.engines.figures import add_timings, timings_summary
from llmflow.results import BatchReport, EndpointFigures

Transport = Literal["aiohttp", "httpx"]
MAX_MOVES = 8  # times one request may move to another replica after failing to reach one
UNAVAILABLE = frozenset({502, 503, 504})  # "not now", never the line's answer: a rerun sends it again
ProgressFn = Callable[[int, int], None]
RetryAnswer = Callable[[int, Any], bool]  # (status, body): an answer that is "not now", sent again like a 503


class RetryableError(Exception):
    """A failure worth another attempt: timeout, connection error, 5xx.

    ``connection``: the server could not be reached or went away mid-answer (refused, reset,
    disconnected); with replicas, such a request moves to another one at once.
    """

    def __init__(self, message: str, *, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection


@dataclass
class HttpResult:
    status: int
    request_id: str
    body: Any
    raw: bytes = b""


class Sender(Protocol):
    async def post(self, path: str, payload: bytes) -> HttpResult: ...

    async def aclose(self) -> None: ...


def _message(body: Any, limit: int = 200) -> str:
    """The error's message from an OpenAI-style error body (or the body itself), shortened."""
    if isinstance(body, dict):
        err = body.get("error", body)
        body = err.get("message", err) if isinstance(err, dict) else err
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= limit else text[:limit] + "..."


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


class AiohttpSender:
    """aiohttp session; phases mapped from ``Timeouts``.

    aiohttp's ``connect`` covers waiting for a pool slot plus the TCP connect, so it gets
    ``pool + connect``; ``sock_connect`` = connect. The read timeout is ``ReadDeadlines``
    (one sweep, not aiohttp's ``sock_read`` timer per chunk: see ``llmflow.batch.deadlines``).
    aiohttp has no write timeout of its own: request bodies are small and the read timeout
    bounds the wait after them.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeouts: Timeouts, limit: int) -> None:
        self._base = base_url.rstrip("/")
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.pool + timeouts.connect,
            sock_connect=timeouts.connect,
        )
        self._deadlines = ReadDeadlines(timeouts.read)
        self._session = aiohttp.ClientSession(
            headers={**headers, "Content-Type": "application/json"},
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=limit),
        )

    async def post(self, path: str, payload: bytes) -> HttpResult:
        task = asyncio.current_task()
        assert task is not None
        self._deadlines.begin(task)
        try:
            async with self._session.post(self._base + path, data=payload) as resp:
                raw = await resp.read()
                status = resp.status
                request_id = resp.headers.get("x-request-id", "")
        except asyncio.CancelledError:
            if self._deadlines.timed_out(task):
                limit = self._deadlines.limit_s
                raise RetryableError(f"TimeoutError: no answer within the read timeout ({limit:g} s)") from None
            raise
        except TimeoutError as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}", connection=True) from exc
        finally:
            self._deadlines.end(task)
        return HttpResult(status, request_id, _decode(raw), raw)

    async def aclose(self) -> None:
        self._deadlines.close()
        await self._session.close()


class HttpxSender:
    """httpx AsyncClient with the four timeout phases as httpx names them."""

    def __init__(self, base_url: str, headers: dict[str, str], timeouts: Timeouts, limit: int) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={**headers, "Content-Type": "application/json"},
            timeout=httpx.Timeout(
                connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
            ),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        )

    async def post(self, path: str, payload: bytes) -> HttpResult:
        try:
            resp = await self._client.post(path, content=payload)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}", connection=True) from exc
        raw = resp.content
        return HttpResult(resp.status_code, resp.headers.get("x-request-id", ""), _decode(raw), raw)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_sender(transport: Transport, base_url: str, api_key: str | None, timeouts: Timeouts, limit: int) -> Sender:
    headers = bearer(api_key)
    cls = AiohttpSender if transport == "aiohttp" else HttpxSender
    return cls(base_url, headers, timeouts, limit)


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)``, capped, plus up to ``base`` jitter."""
    return min(max_s, base_s * 2 ** (attempt - 1)) + random.uniform(0, base_s)


@dataclass
class _Tally:
    sent: int = 0
    succeeded: int = 0
    failed_http: int = 0
    failed_statuses: dict[int, int] = field(default_factory=dict)
    unfinished: int = 0
    invalid: int = 0
    retries: int = 0
    moved: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server_timings: dict[str, float] = field(default_factory=dict)
    done: int = 0
    records: int = 0
    failing_streak: int = 0
    stopped_early: bool = False
    pending: set[asyncio.Task[None]] = field(default_factory=set)


class _BatchPass:
    """One pass over the input: what ``run_batch`` does, a step per method."""

    def __init__(
        self,
        config: BatchConfig,
        pool: EndpointPool,
        overrides: dict[str, Any],
        progress: ProgressFn | None,
        progress_every_s: float,
        served_name: str | None = None,
        per_model: bool = False,
        retry_answer: RetryAnswer | None = None,
    ) -> None:
        self.config = config
        self.retry_answer = retry_answer
        self.by_model: dict[str, ModelTally] | None = {} if per_model else None
        self.pool = pool
        # merged into each body (one dict copy, made only when there is something to merge);
        # output-length fields mean nothing to an embedding, the served name means the same
        renamed = {"model": served_name} if config.rewrite_model_to_served_name else {}
        self.overrides = {**overrides, **renamed}
        self.embeddings_overrides = renamed
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.errors_path = errors_path_for(config.output_path)
        self.total = count_lines(config.input_path)
        self.finished = load_finished(config.output_path)
        self.tally = _Tally()
        self.gate = asyncio.Semaphore(config.concurrency)
        self.id_prefix = uuid.uuid4().hex[
            :12
        ]  # record ids: random per pass, then a counter (uuid4 each was measurable)
        self.last_report = 0.0

    def tick(self) -> None:
        """One input line dealt with; progress at most every ``progress_every_s``."""
        self.tally.done += 1
        now = time.monotonic()
        if self.progress and now - self.last_report >= self.progress_every_s:
            self.last_report = now
            self.progress(self.tally.done, self.total)

    async def post(self, path: str, payload: bytes) -> tuple[HttpResult, Endpoint]:
        """One request with retries: timeouts, connection errors and 5xx, backing off between.

        With replicas, a request that could not reach its replica moves to another at once
        (``EndpointPool.connection_failed``), up to ``MAX_MOVES`` times, without using an attempt.
        """
        config = self.config
        attempt_no, moves = 1, 0
        while True:
            ep = await self.pool.acquire()
            try:
                result = await ep.sender.post(path, payload)
                if result.status >= 500 and (attempt_no < config.max_attempts or result.status in UNAVAILABLE):
                    raise RetryableError(f"HTTP {result.status}: {str(result.body)[:200]}")
                if self.retry_answer is not None and self.retry_answer(result.status, result.body):
                    raise RetryableError(f"HTTP {result.status}, not the line's answer: {_message(result.body)}")
                return result, ep  # a 5xx on the last attempt is the server's final answer to the line
            except RetryableError as exc:
                if exc.connection and moves < MAX_MOVES and self.pool.connection_failed(ep):
                    self.tally.moved += moves == 0  # requests moved, not moves
                    moves += 1
                    continue
                if attempt_no == config.max_attempts:
                    raise
                self.tally.retries += 1
            finally:
                self.pool.release(ep)
            # not counted against any replica while it waits
            await asyncio.sleep(backoff_delay(attempt_no, config.backoff_s, config.backoff_max_s))
            attempt_no += 1

    async def one(self, line: int, custom_id: str, path: str, payload: bytes, model: ModelTally | None = None) -> None:
        """Send one request and append its record (or, having given up, its error line);
        ``model``: its model's tally, when the pass counts per model."""
        tally = self.tally
        try:
            result, ep = await self.post(path, payload)
        except (RetryableError, NoReplicaLeft) as exc:
            tally.unfinished += 1
            if model is not None:
                model.unfinished += 1
            tally.failing_streak += 1
            if isinstance(exc, NoReplicaLeft) or tally.failing_streak >= self.config.stop_after_failures:
                tally.stopped_early = True  # the endpoint is down: stop sending, let the caller recover
            reason = (
                f"no replica left: {exc}"
                if isinstance(exc, NoReplicaLeft)
                else f"gave up after {self.config.max_attempts} attempts: {exc}"
            )
            self.errors.write({"line": line, "custom_id": custom_id, "reason": reason})
        else:
            tally.failing_streak = 0
            prompt, completion = self.record(line, custom_id, result, model)
            self.pool.answered(ep, result.status < 300, prompt, completion)
        finally:
            self.gate.release()
            self.tick()

    def record(self, line: int, custom_id: str, result: HttpResult, model: ModelTally | None = None) -> tuple[int, int]:
        """Append the answer in the batch output shape; count its status, usage and timings
        (an error answer also goes to the errors file). Returns its (prompt, completion) tokens."""
        tally = self.tally
        tally.records += 1
        record_id = f"batch_req_{self.id_prefix}{tally.records:08x}"
        request_id = result.request_id or record_id
        self.out.write_line(output_line(record_id, custom_id, result.status, request_id, result.body, result.raw))
        if result.status >= 300:
            tally.failed_http += 1
            if model is not None:
                model.failed_http += 1
            tally.failed_statuses[result.status] = tally.failed_statuses.get(result.status, 0) + 1
            self.errors.write(
                {
                    "line": line,
                    "custom_id": custom_id,
                    "reason": f"answered HTTP {result.status}: {_message(result.body)}",
                }
            )
            return 0, 0
        tally.succeeded += 1
        body = result.body if isinstance(result.body, dict) else {}
        prompt = completion = 0
        if isinstance(usage := body.get("usage"), dict):  # embeddings: prompt_tokens and total_tokens only
            prompt = usage.get("prompt_tokens") or 0
            completion = usage.get("completion_tokens") or 0
            tally.prompt_tokens += prompt
            tally.completion_tokens += completion
        timings = body.get("timings")
        if timings:  # llama-server's own per-request figures
            add_timings(tally.server_timings, timings)
        if model is not None:
            model.succeeded += 1
            model.prompt_tokens += prompt
            model.completion_tokens += completion
            if isinstance(timings, dict):
                model.add_timings(timings)
        return prompt, completion

    async def send_all(self) -> None:
        """Stream the input: skip what is finished, note invalid lines, keep ``concurrency`` in
        flight, stop sending once the endpoint stopped answering."""
        tally = self.tally
        for parsed in parse_lines(self.config.input_path):
            if tally.stopped_early:
                break
            if parsed.request is None:
                tally.invalid += 1
                self.errors.write({"line": parsed.line, "custom_id": parsed.custom_id, "reason": parsed.error})
                self.tick()
                continue
            req = parsed.request
            if req.custom_id in self.finished:
                self.tick()
                continue
            overrides = self.embeddings_overrides if req.url == EMBEDDINGS_URL else self.overrides
            body = {**req.body, **overrides} if overrides else req.body
            payload = json.dumps(body).encode()
            await self.gate.acquire()
            if tally.stopped_early:
                self.gate.release()
                break
            tally.sent += 1
            model = None
            if self.by_model is not None:
                name = body.get("model")
                model = self.by_model.setdefault(name if isinstance(name, str) else NO_MODEL, ModelTally())
                model.sent += 1
            task = asyncio.create_task(self.one(parsed.line, req.custom_id, req.url, payload, model))
            tally.pending.add(task)
            task.add_done_callback(tally.pending.discard)
        if tally.pending:
            await asyncio.gather(*tally.pending)

    async def run(self) -> BatchReport:
        started = time.perf_counter()
        with (
            JsonlAppender(self.config.output_path) as self.out,
            JsonlAppender(self.errors_path, truncate=True) as self.errors,
        ):
            try:
                await self.send_all()
            finally:
                for task in list(self.tally.pending):
                    task.cancel()
                await self.pool.aclose()
        wall = time.perf_counter() - started
        if self.progress:
            self.progress(self.tally.done, self.total)
        first = min((ep.first_sent for ep in self.pool.endpoints.values() if ep.first_sent), default=None)
        return self.report(wall, waited_s=(first - started) if first is not None else 0.0)

    def report(self, wall_s: float, waited_s: float = 0.0) -> BatchReport:
        tally = self.tally
        report = BatchReport(
            input_path=self.config.input_path,
            output_path=self.config.output_path,
            errors_path=self.errors_path,
            input_lines=self.total,
            already_done=len(self.finished),
            sent=tally.sent,
            succeeded=tally.succeeded,
            failed_http=tally.failed_http,
            failed_statuses=dict(sorted(tally.failed_statuses.items())),
            unfinished=tally.unfinished,
            invalid_lines=tally.invalid,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            wall_s=wall_s,
            waited_s=round(waited_s, 3),
            retries=tally.retries,
            moved=tally.moved,
            endpoints=[EndpointFigures(**f) for f in self.pool.figures()] if self.pool.replicated else [],
            stopped_early=tally.stopped_early,
            server_timings=timings_summary(tally.server_timings),
        )
        if self.by_model is None:
            return report
        return BatchReportByModel(**dict(report), models=model_figures(self.by_model, wall_s))


class ReplicaSource(Watcher, Protocol):
    """Replicas that come and go while the batch runs (``flows.replicas.ReplicaSet``)."""

    def attach(self, pool: EndpointPool, loop: asyncio.AbstractEventLoop) -> None: ...

    def detach(self, pool: EndpointPool) -> None: ...


async def run_batch(
    config: BatchConfig,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    replicas: ReplicaSource | None = None,
    body_overrides: dict[str, Any] | None = None,
    served_name: str | None = None,
    per_model: bool = False,
    retry_answer: RetryAnswer | None = None,
    transport: Transport = "aiohttp",
    progress: ProgressFn | None = None,
    progress_every_s: float = 0.5,
) -> BatchReport:
    """One pass over ``config.input_path``; resumable, see module docstring.

    Args:
        config: input/output paths, concurrency, retries, timeouts.
        base_url: where the OpenAI-style API is, e.g. ``http://127.0.0.1:PORT`` (one server).
        api_key: bearer key, or None when the server has none.
        replicas: instead of ``base_url``: the replicas of a session, spread over (least
            outstanding requests first) as they become ready.
        body_overrides: fields merged into every completion and chat body (e.g. ``min_tokens``);
            /v1/embeddings bodies have no output to shape.
        served_name: the session's served model name; with ``config.rewrite_model_to_served_name``
            every body's ``model`` is replaced by it.
        per_model: count each model the lines name (a router serves several): the report is then
            a ``BatchReportByModel``.
        retry_answer: says which answers are "not now" rather than the line's answer (a router's
            "model is not running" after a swap): retried like a 503, unfinished if they last.
        transport: ``aiohttp`` (default) or ``httpx``.
        progress: called with (finished, total) at most every ``progress_every_s`` and at the end.
    """
    if (base_url is None) == (replicas is None):
        raise ValueError("run_batch takes a base_url or replicas, one of the two")
    if config.rewrite_model_to_served_name and not served_name:
        raise ValueError("rewrite_model_to_served_name needs the served_name to send")
    pool = EndpointPool(
        lambda url, key: make_sender(transport, url, key, config.timeouts, config.concurrency), watcher=replicas
    )
    if replicas is not None:
        replicas.attach(pool, asyncio.get_running_loop())
    else:
        pool.add("server", base_url, api_key)
    try:
        return await _BatchPass(
            config, pool, body_overrides or {}, progress, progress_every_s, served_name, per_model, retry_answer
        ).run()
    finally:
        if replicas is not None:
            replicas.detach(pool)


def run_batch_sync(
    config: BatchConfig,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    progress: ProgressFn | None = None,
    **kwargs: Any,
) -> BatchReport:
    """``run_batch`` for synchronous callers (Prefect tasks, the CLI).

    Runs through ``aio.run_sync`` so that Ctrl-C and Prefect's cancellation raise in the
    caller's thread; the pass is then cancelled with its finished records already on disk.
    Progress and its Prefect API calls stay on the caller's thread and context.
    """
    latest: list[tuple[int, int]] = []
    shown: list[tuple[int, int]] = []

    def tick() -> None:
        if progress and latest and (not shown or latest[-1] != shown[-1]):
            shown[:] = [latest[-1]]
            del latest[:-1]
            progress(*shown[0])

    return run_sync(
        lambda: run_batch(
            config, base_url, api_key, progress=(lambda d, t: latest.append((d, t))) if progress else None, **kwargs
        ),
        tick,
        name="llmflow-batch-loop",
    )


__all__ = ["run_batch", "run_batch_sync", "RetryableError", "HttpResult", "make_sender"]

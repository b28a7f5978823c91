"""Is the server really answering? One probe for the health gate, the hold session and the campaign.

"Ready" means the engine's readiness signal is up (``probe``) *and*, for the gate, a one-token
completion succeeds: some servers open their port (or answer /v1/models) before they can
generate. ``answers`` is the single probe a running session uses to tell a server that still
serves from one that has gone quiet.

A llama-server router (``engine.router``) is ready when it answers and lists a model it can
serve: it loads models only when a request names one (``router_ready``).

The deep gate (``gate.deep_context``, off by default) then sends one completion with a prompt
of the largest context the session will use, made to the exact token count as campaign prompts
are: a server that answers "ping" but cannot hold a long prompt fails here, naming the size,
rather than hours later in a campaign or batch.

A model can take minutes to load (vLLM: 40-70 s even for a tiny one); the gate reports every
``report_every_s`` what it saw last and the server log's last line, so the wait is not silent.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from llmflow import engines
from llmflow.bench.prompts import PromptError, PromptFactory
from llmflow.errors import ConfigError, GateFailed
from llmflow.placements import driver_for
from llmflow.placements.base import tail_note
from llmflow.results import Ready, ServerHandle
from llmflow.router import is_router, parse_models

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


def transport_error_text(exc: httpx.TransportError) -> str:
    """A failed connection as a person reads it: nothing listening yet, or no answer in time."""
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "connection closed without an answer"  # a forward with nothing listening behind it yet
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Seen:
    """One readiness probe: its class, the response if any, and what it saw in words."""

    state: ProbeState
    resp: httpx.Response | None
    text: str


def look(client: httpx.Client, path: str) -> Seen:
    """One GET of the engine's readiness path, classified and described."""
    try:
        resp = client.get(path)
    except httpx.TransportError as exc:
        return Seen("loading", None, transport_error_text(exc))
    return Seen(classify(resp.status_code), resp, f"{resp.status_code} {resp.reason_phrase}".strip())


def probe(client: httpx.Client, path: str) -> tuple[ProbeState, httpx.Response | None]:
    """One GET of the engine's readiness path, classified; the response when there was one."""
    seen = look(client, path)
    return seen.state, seen.resp


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def last_log_line(tail: str | None, width: int = 200) -> str | None:
    """The last non-blank line of a log's tail, without colour codes; a progress bar's latest
    frame (after the last carriage return); cut to ``width``. None when there is none."""
    if not tail:
        return None
    for line in reversed(re.split(r"[\r\n]+", _ANSI.sub("", tail))):
        if line.strip():
            line = line.strip()
            return line if len(line) <= width else line[: width - 1] + "…"
    return None


def gate_progress_line(waited_s: float, path: str, seen: str, log_line: str | None) -> str:
    """``not ready after 45s: GET /health: 503 Service Unavailable; server log: <last line>``."""
    line = f"not ready after {waited_s:.0f}s: GET {path}: {seen}"
    return line + (f"; server log: {log_line}" if log_line else "; server log: (empty)")


@dataclass(frozen=True)
class ServerLog:
    """Where the server's log is (a path, or ``host:path``) and how to read its last lines."""

    where: str
    tail: Callable[[int], str | None]

    def read(self, lines: int) -> str | None:
        """Never fails the gate: a log that cannot be read now is reported as such."""
        try:
            return self.tail(lines)
        except Exception as exc:  # noqa: BLE001 - an SSH hiccup must not end the wait
            return f"(could not read {self.where}: {exc})"

    def note(self) -> str:
        """``log tail (<where>):`` and the tail, for an error that ends the session."""
        return tail_note(self.where, self.read(30) or "(no log)")


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
    log: ServerLog | None = None,
    report: Callable[[str], None] | None = None,
    report_every_s: float = 15.0,
    deep_context: int | None = None,
) -> Ready:
    """Poll until ready; ``check_alive`` raises as soon as the process or job is gone.

    Every ``report_every_s`` (one log read each time) ``report`` gets a progress line; errors
    that end the wait carry the log's tail and where it is. With ``deep_context``, a ready
    server must also answer one prompt of that many tokens (``deep_check``)."""
    path = engines.spec_for(engine).readiness_path
    started = last_report = time.monotonic()
    polls = 0
    timeout = httpx.Timeout(10.0, read=60.0)

    def ending(message: str) -> str:
        return f"{message}; {log.note()}" if log is not None else message

    with httpx.Client(base_url=base_url, headers=handle.auth_headers(), timeout=timeout) as client:
        while True:
            check_alive()
            polls += 1
            seen = look(client, path)
            resp, said = seen.resp, seen.text
            if seen.state == "fatal":
                raise GateFailed(ending(f"GET {path} answered {resp.status_code}: {resp.text[:300]}"))  # type: ignore[union-attr]
            if seen.state == "ready" and is_router(engine):
                return router_ready(client, handle, engine, deep_context, deadline_s, started, polls, ending, report)
            if seen.state == "ready":
                test = client.post(
                    "/v1/completions", json={"model": handle.served_name, "prompt": "ping", "max_tokens": 1}
                )
                if test.status_code == 200:
                    if deep_context is not None:
                        try:
                            n = deep_check(client, handle.served_name, engine, deep_context, deadline_s)
                        except GateFailed as exc:
                            raise GateFailed(ending(str(exc))) from exc
                        if report is not None:
                            report(f"deep gate: a {n}-token prompt answered")
                    return Ready(
                        seconds_to_ready=round(time.monotonic() - started, 3), polls=polls, models=_models(client)
                    )
                if classify(test.status_code) == "fatal":
                    raise GateFailed(ending(f"test completion answered {test.status_code}: {test.text[:300]}"))
                said = f"{said}, but a test completion answered {test.status_code}"
            now = time.monotonic()
            if now - started > deadline_s:
                last = f"last status {resp.status_code}" if resp is not None else f"last: {said}"
                raise TimeoutError(
                    ending(f"server not ready after {deadline_s:.0f}s ({polls} polls of {path}, {last})")
                )
            if report is not None and now - last_report >= report_every_s:
                last_report = now
                report(gate_progress_line(now - started, path, said, last_log_line(log.read(5) if log else None)))
            time.sleep(interval_s)


def router_model(served: list[str], served_name: str) -> str:
    """The model a router's deep gate loads: ``model.served_name`` when the router has it, else the
    first it lists (a router's lines name their own models; ``served_name`` may name none)."""
    return served_name if served_name in served else served[0]


def router_ready(
    client: httpx.Client,
    handle: ServerHandle,
    engine: Any,
    deep_context: int | None,
    deadline_s: float,
    started: float,
    polls: int,
    ending: Callable[[str], str],
    report: Callable[[str], None] | None,
) -> Ready:
    """A router (``engine.router``) is ready when it answers and lists at least one model it can
    serve. No test completion: it would load a model (each runs in a child server of its own, so
    one answer proves one model) and count as a load before the batch; the deep gate, when on,
    loads one model to send its long prompt."""
    try:
        states = parse_models(client.get("/v1/models").json())
    except (httpx.HTTPError, ValueError) as exc:
        raise GateFailed(ending(f"the router answers /health but not GET /v1/models: {exc}")) from exc
    served = [s.model for s in states]
    if not served:
        raise GateFailed(ending("the router lists no models: model.path has no *.gguf file or preset it can serve"))
    if deep_context is not None:
        model = router_model(served, handle.served_name)
        try:
            n = deep_check(client, model, engine, deep_context, deadline_s)
        except GateFailed as exc:
            raise GateFailed(ending(str(exc))) from exc
        if report is not None:
            report(f"deep gate: a {n}-token prompt answered by {model}")
    return Ready(seconds_to_ready=round(time.monotonic() - started, 3), polls=polls, models=served)


def gate_server(
    config: Any,
    handle: ServerHandle,
    base_url: str,
    report: Callable[[str], None] | None = None,
    report_every_s: float = 15.0,
) -> Ready:
    """``wait_ready`` with the session's settings, watching the handle's process or job and
    reading its log through the placement (a file here, ``tail`` over SSH on a host)."""
    driver = driver_for(config)
    log = None
    if handle.log_path is not None:
        log = ServerLog(driver.located(handle.log_path), lambda lines: driver.log_tail(handle, lines))
    return wait_ready(
        base_url,
        handle,
        config.engine,
        deadline_s=config.gate.deadline_s,
        interval_s=config.gate.interval_s,
        check_alive=lambda: driver.check_alive(handle),
        log=log,
        report=report,
        report_every_s=report_every_s,
        deep_context=deep_gate_size(config),
    )


def engine_context_length(engine: Any) -> int | None:
    """The context length an engine's config states (``n_ctx``, ``max_model_len``); None when it
    states none (a ``command`` server, vLLM left to the model's own length)."""
    for name in ("n_ctx", "max_model_len"):
        value = getattr(engine, name, None)
        if isinstance(value, int):
            return value
    return None


def deep_gate_size(config: Any, largest_context: int | None = None, output_tokens: int | None = None) -> int | None:
    """The prompt length the deep gate sends, or None when it is off.

    ``gate.deep_context`` as a number is that size. ``"auto"`` is the largest context the
    session will use: ``largest_context`` when the caller knows it (a campaign: its largest
    context size), else the engine's context length minus ``output_tokens`` (a batch's fixed
    output length; 1 when unknown: the gate asks for one token)."""
    deep = config.gate.deep_context
    if deep is None or isinstance(deep, int):
        return deep
    if largest_context is not None:
        return largest_context
    length = engine_context_length(config.engine)
    if length is None:
        raise ConfigError(
            f"gate.deep_context: 'auto' needs the engine's context length, which the {config.engine.kind} engine's "
            "settings do not state; give the size (gate.deep_context = 4096, say)"
        )
    return max(1, length - (output_tokens or 1))


def with_deep_gate(config: Any, largest_context: int | None = None, output_tokens: int | None = None) -> Any:
    """The session with an ``"auto"`` deep gate fixed to a size for this run (a campaign passes its
    largest context); unchanged otherwise."""
    if config.gate.deep_context != "auto":
        return config
    size = deep_gate_size(config, largest_context, output_tokens)
    return config.model_copy(update={"gate": config.gate.model_copy(update={"deep_context": size})})


def deep_check(client: httpx.Client, served_name: str, engine: Any, size: int, timeout_s: float) -> int:
    """One completion with a prompt of exactly ``size`` tokens (as the server counts them) and one
    output token; its prompt length. ``GateFailed`` naming the size when the server refuses it,
    fails on it, cuts it short, or when no such prompt can be made."""
    what = f"deep gate (gate.deep_context = {size})"
    try:
        factory = PromptFactory(client, engine, served_name)
        [(text, n)] = factory.prompts([secrets.token_hex(4)], size)
    except PromptError as exc:
        raise GateFailed(f"{what}: {exc}") from exc
    except httpx.HTTPStatusError as exc:
        code, body = exc.response.status_code, exc.response.text[:300]
        raise GateFailed(f"{what}: the server refused to measure a {size}-token prompt: HTTP {code}: {body}") from exc
    except httpx.TransportError as exc:
        raise GateFailed(f"{what}: measuring a {size}-token prompt: {transport_error_text(exc)}") from exc
    timeout = httpx.Timeout(10.0, read=timeout_s)
    try:
        resp = client.post(
            "/v1/completions", json={"model": served_name, "prompt": text, "max_tokens": 1}, timeout=timeout
        )
    except httpx.TransportError as exc:
        raise GateFailed(f"{what}: a {n}-token prompt got no answer: {transport_error_text(exc)}") from exc
    if resp.status_code != 200:
        raise GateFailed(
            f"{what}: the server answers short prompts but not a {n}-token prompt: "
            f"HTTP {resp.status_code}: {resp.text[:300]}"
        )
    try:
        counted = resp.json()["usage"]["prompt_tokens"]
    except (ValueError, KeyError, TypeError):
        counted = None
    if isinstance(counted, int) and counted < n:
        raise GateFailed(f"{what}: the server cut a {n}-token prompt to {counted} tokens")
    return n

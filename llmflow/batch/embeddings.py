"""Batches with /v1/embeddings lines: the server must be started with embeddings on.

llama.cpp's servers answer /v1/embeddings beside completions and chat once started with a flag
(the engine's ``embeddings`` setting), so the batch flow turns it on when the input has such
lines to send, rather than every line getting a 500 or 501 from a server started without it.
vLLM runs one model runner per server (generate or pooling) and cannot: that is refused before
any server starts, naming the field.
"""

from __future__ import annotations

from pathlib import Path

from llmflow import engines
from llmflow.batch.jsonl import EMBEDDINGS_URL, parse_lines
from llmflow.config import VLLM_NO_EMBEDDINGS, SessionConfig
from llmflow.errors import ConfigError

FIELD = "session.engine.embeddings"
WHY_NOT = {"vllm": VLLM_NO_EMBEDDINGS}


def _refusal(session: SessionConfig, what: str) -> ConfigError:
    kind = session.engine.kind
    why = WHY_NOT.get(kind, f"the {kind} engine cannot serve them beside generation")
    return ConfigError(f"{FIELD}: {what}, but {why}")


def serve_embeddings(session: SessionConfig, lines: int) -> tuple[SessionConfig, str | None]:
    """``session`` able to answer ``lines`` /v1/embeddings lines, and a sentence for the log when
    it had to change: its engine's ``embeddings`` turned on. A command engine (an unknown server)
    is left as it is and its lines are sent as they are; ``ConfigError`` for an engine that cannot."""
    if not lines or getattr(session.engine, "embeddings", False):
        return session, None
    can = engines.spec_for(session.engine).embeddings_beside_generation
    if can is None:
        return session, None
    if not can:
        raise _refusal(session, f"the input has {lines} /v1/embeddings lines to send")
    engine = session.engine.model_copy(update={"embeddings": True})
    note = f"{lines} /v1/embeddings lines to send: starting the {engine.kind} server with embeddings on ({FIELD})"
    return session.model_copy(update={"engine": engine}), note


def first_embeddings_line(path: Path) -> int | None:
    """Line number of the input's first valid /v1/embeddings request, or None. A line that does
    not mention the URL is not parsed, so a file without any costs one read."""
    with path.open("rb") as f:
        if not any(EMBEDDINGS_URL.encode() in raw for raw in f):
            return None
    return next((p.line for p in parse_lines(path) if p.request and p.request.url == EMBEDDINGS_URL), None)


def check_embeddings(session: SessionConfig, input_path: Path) -> None:
    """Preflight: ``ConfigError`` naming the field when the input has /v1/embeddings lines and
    the engine cannot serve them; the input is read only for such an engine."""
    if engines.spec_for(session.engine).embeddings_beside_generation is not False:
        return
    if (line := first_embeddings_line(input_path)) is not None:
        raise _refusal(session, f"line {line} of {input_path} is a /v1/embeddings request")

"""A batch with /v1/embeddings lines starts its server with embeddings on, or is refused before
any server starts when the engine cannot serve them beside generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow.batch.embeddings import check_embeddings, first_embeddings_line, serve_embeddings
from llmflow.config import CommandEngine, LlamaCppEngine, LlamaServerEngine, SessionConfig, VllmEngine
from llmflow.errors import ConfigError


def _input(tmp_path: Path, urls: list[str]) -> Path:
    src = tmp_path / "in.jsonl"
    body = {"prompt": "x", "input": "x"}
    src.write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "method": "POST", "url": u, "body": body}) + "\n"
            for i, u in enumerate(urls)
        )
    )
    return src


@pytest.mark.parametrize("engine", [LlamaCppEngine(), LlamaServerEngine()])
def test_llama_cpp_engines_get_embeddings_turned_on_with_a_log_line(engine):
    session = SessionConfig(engine=engine)
    served, note = serve_embeddings(session, 3)
    assert served.engine.embeddings is True and session.engine.embeddings is False  # a copy
    assert (
        note
        == f"3 /v1/embeddings lines to send: starting the {engine.kind} server with embeddings on (session.engine.embeddings)"
    )
    assert serve_embeddings(served, 3) == (served, None)  # already on: nothing to say
    assert serve_embeddings(session, 0) == (session, None)  # no such lines: left as it is


def test_vllm_is_refused_naming_the_field():
    with pytest.raises(
        ConfigError,
        match=r"^session\.engine\.embeddings: the input has 2 /v1/embeddings lines to send, but vLLM serves generation or embeddings, never both",
    ):
        serve_embeddings(SessionConfig(engine=VllmEngine()), 2)


def test_a_command_engine_is_sent_the_lines_as_they_are():
    session = SessionConfig(engine=CommandEngine(argv=["srv", "{port}"]))
    assert serve_embeddings(session, 2) == (session, None)


def test_preflight_reads_the_input_only_for_an_engine_that_cannot(tmp_path: Path):
    mixed = _input(tmp_path, ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
    assert first_embeddings_line(mixed) == 3
    with pytest.raises(
        ConfigError, match=rf"^session\.engine\.embeddings: line 3 of {mixed} is a /v1/embeddings request, but vLLM"
    ):
        check_embeddings(SessionConfig(engine=VllmEngine()), mixed)
    check_embeddings(SessionConfig(), mixed)  # llama_cpp: turned on by the flow, nothing to refuse
    check_embeddings(SessionConfig(engine=VllmEngine()), _input(tmp_path, ["/v1/completions"]))
    assert first_embeddings_line(_input(tmp_path, ["/v1/completions"])) is None

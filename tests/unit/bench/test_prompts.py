"""Exact-length prompts against servers the engine setting says nothing about: which tokenize
route a server has is found by asking, a server without one is measured with 1-token
completions, and a server the tool cannot measure is a tool error (``PromptError``), not a
rejected cell. Fake servers on httpx's MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest

from llmflow.bench.prompts import PromptError, PromptFactory
from llmflow.config import CommandEngine, LlamaCppEngine, VllmEngine

COMMAND = CommandEngine(argv=["some-server", "--port", "{port}"])


def _tokens(text: str) -> int:
    """The fake tokenizer: one token per word and per pad character."""
    return len(text.rstrip(".").split()) + (len(text) - len(text.rstrip(".")))


def fake_server(routes: set[str], bos: int = 1, usage: bool = True, log: list[str] | None = None):
    """A server offering the tokenize ``routes`` named (``vllm``, ``llama_server``,
    ``llama_cpp``), completions that count ``bos`` more than its tokenizer, and 404 elsewhere.
    llama-server answers a body without ``content`` with no tokens, as the real one does."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        path = request.url.path
        if log is not None:
            log.append(path)
        if path == "/tokenize" and "vllm" in routes:
            if "prompt" not in body:
                return httpx.Response(400, json={"error": "prompt: field required"})
            return httpx.Response(200, json={"count": _tokens(body["prompt"]), "tokens": []})
        if path == "/tokenize" and "llama_server" in routes:
            n = _tokens(body["content"]) + bos if "content" in body else 0
            return httpx.Response(200, json={"tokens": list(range(n))})
        if path == "/extras/tokenize" and "llama_cpp" in routes:
            return httpx.Response(200, json={"tokens": list(range(_tokens(body["input"]) + bos))})
        if path == "/v1/completions":
            answer: dict = {"choices": [{"text": "x"}]}
            if usage:
                answer["usage"] = {"prompt_tokens": _tokens(body["prompt"]) + bos, "completion_tokens": 1}
            return httpx.Response(200, json=answer)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))


def _exact(factory: PromptFactory, target: int = 100, n: int = 5) -> None:
    prompts = factory.prompts([f"{i:08x}" for i in range(n)], target)
    assert [count for _, count in prompts] == [target] * n
    assert all(_tokens(text) + 1 == target for text, _ in prompts)  # as the completions count them


@pytest.mark.parametrize(
    ("engine", "routes", "found"),
    [
        (COMMAND, {"llama_server"}, "/tokenize"),  # llama-server's body, after vLLM's got no tokens
        (COMMAND, {"vllm"}, "/tokenize"),
        (COMMAND, {"llama_cpp"}, "/extras/tokenize"),
        (LlamaCppEngine(), {"vllm"}, "/tokenize"),  # an endpoint left at the default engine kind
        (VllmEngine(), {"llama_cpp"}, "/extras/tokenize"),  # a declared engine that is wrong
    ],
    ids=["command-llama-server", "command-vllm", "command-llama-cpp", "default-kind-on-vllm", "vllm-kind-on-llama-cpp"],
)
def test_the_tokenize_route_is_found_by_asking(engine, routes, found):
    log: list[str] = []
    factory = PromptFactory(fake_server(routes, log=log), engine, "m")
    assert factory.has_tokenizer and factory.offset in (0, 1)
    assert factory.route("x", "m")[0] == found  # type: ignore[misc]
    assert log.count("/v1/completions") == 1  # one usage probe for the offset
    _exact(factory)


def test_the_engine_s_own_route_is_asked_first():
    log: list[str] = []
    PromptFactory(fake_server({"llama_cpp", "vllm"}, log=log), LlamaCppEngine(), "m")
    assert log[0] == "/extras/tokenize" and "/tokenize" not in log


def test_a_server_without_a_tokenizer_is_calibrated_with_usage():
    log: list[str] = []
    factory = PromptFactory(fake_server(set(), log=log), COMMAND, "m")
    assert not factory.has_tokenizer
    assert factory.tried == ["/tokenize", "/tokenize", "/extras/tokenize"]  # vLLM's, llama-server's, llama-cpp's
    before = log.count("/v1/completions")
    _exact(factory)
    assert log.count("/v1/completions") > before  # every count a 1-token completion


def test_a_server_the_tool_cannot_measure_is_a_tool_error_not_a_verdict():
    with pytest.raises(PromptError, match=r"tool error.*tried /tokenize, /tokenize, /extras/tokenize.*usage"):
        PromptFactory(fake_server(set(), usage=False), COMMAND, "m")
    assert not issubclass(PromptError, httpx.HTTPError)  # the cell task records HTTP errors as verdicts


def test_a_completions_route_that_refuses_the_probe_is_a_tool_error():
    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    with pytest.raises(PromptError, match="HTTP 404"):
        PromptFactory(client, COMMAND, "m")


def test_a_server_error_on_the_probe_stays_an_http_error():
    """A 5xx is the server failing (the cell's verdict: crashed), not the tool."""
    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    with pytest.raises(httpx.HTTPStatusError):
        PromptFactory(client, COMMAND, "m")


def test_a_tokenizer_without_usage_in_completions_is_a_tool_error_naming_the_route():
    with pytest.raises(PromptError, match=r"its tokenize route /extras/tokenize answers, but .*usage"):
        PromptFactory(fake_server({"llama_cpp"}, usage=False), COMMAND, "m")

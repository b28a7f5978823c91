"""Prompts of an exact token length, each with a unique prefix.

A campaign cell asks for prompts of N tokens. Text is built from a unique id (so no two
requests share a prefix and the server's prefix cache cannot make prefill look faster than it
is) plus filler words, and measured with the server's own tokenizer (``/tokenize``,
``/extras/tokenize``) until it is exactly N tokens as the completion API counts them. Which
tokenize route a server has is asked, not assumed (an endpoint or a ``command`` engine may be
any server). A server without one is measured the slow way: a 1-token completion and its
``usage.prompt_tokens``. When neither works the factory raises ``PromptError``: the tool
cannot measure this server, which is no verdict on a cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from llmflow import engines
from llmflow.config import LlamaCppEngine, LlamaServerEngine, VllmEngine
from llmflow.errors import PermanentError
from llmflow.router import is_router

FILLER = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not")
PAD = "."

TokenCount = Callable[[str], int]


def prompt_text(uid: str, words: int, pad: int = 0) -> str:
    """``uid: w1 w2 ...`` with ``words`` filler words and ``pad`` trailing pad characters."""
    body = " ".join(FILLER[i % len(FILLER)] for i in range(words))
    return f"{uid}: {body}" + PAD * pad


def fit_prompt(uid: str, target: int, count: TokenCount, max_pad: int = 16) -> tuple[str, int]:
    """The prompt for ``uid`` closest to ``target`` tokens (exact when the tokenizer allows).

    Finds the most filler words that stay within ``target`` (binary search on a count that
    grows with the words), then adds pad characters one at a time. Returns the text and its
    count; a count other than ``target`` means ``target`` cannot be reached (shorter than the
    id itself, say), and the caller records the mismatch.
    """
    low, high = 0, 1
    while count(prompt_text(uid, high)) <= target:
        low, high = high, high * 2
    while high - low > 1:  # count(low) <= target < count(high)
        mid = (low + high) // 2
        if count(prompt_text(uid, mid)) <= target:
            low = mid
        else:
            high = mid
    best = prompt_text(uid, low)
    best_n = count(best)
    for pad in range(1, max_pad + 1):
        if best_n == target:
            break
        text = prompt_text(uid, low, pad)
        n = count(text)
        if n > target:
            break
        best, best_n = text, n
    return best, best_n


class PromptError(PermanentError, RuntimeError):
    """Prompts of an exact length cannot be made for this server: the tool's failure (no tokenize
    route it knows, completions without ``usage.prompt_tokens``), never the server's verdict on
    a cell."""


TokenizeRoute = Callable[[str, str], "tuple[str, dict[str, Any]] | None"]


def known_routes(engine: object) -> list[TokenizeRoute]:
    """Tokenize routes to try, the engine's own first, then every other one a known engine
    offers (vLLM ``/tokenize``, llama-server ``/tokenize``, llama-cpp-python ``/extras/tokenize``):
    an endpoint or a ``command`` engine may be any of them."""
    routes: list[TokenizeRoute] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for candidate in (engine, VllmEngine(), LlamaServerEngine(), LlamaCppEngine()):
        route = engines.spec_for(candidate).tokenize_request
        probe = route("x", "m")
        if probe is None:
            continue
        key = (probe[0], tuple(sorted(probe[1])))
        if key not in seen:
            seen.add(key)
            routes.append(route)
    return [naming_model(r) for r in routes] if is_router(engine) else routes


def naming_model(route: TokenizeRoute) -> TokenizeRoute:
    """``route`` with the model in its body: a llama-server router sends ``/tokenize`` to the
    model the body names, and answers 400 without one."""

    def named(text: str, model: str) -> tuple[str, dict[str, Any]] | None:
        found = route(text, model)
        return None if found is None else (found[0], {"model": model, **found[1]})

    return named


def _count_of(resp: httpx.Response) -> int | None:
    """The token count in a tokenize answer (``count`` or a list of ``tokens``); None when the
    answer is not one."""
    if resp.status_code >= 300:
        return None
    try:
        data = resp.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("count"), int):
        return data["count"]
    tokens = data.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


class PromptFactory:
    """Prompts of exact lengths for one server: its tokenizer (or usage probes), and the
    difference between what its tokenize API counts and what its completions report
    (special tokens), measured once.

    The tokenizer is found by asking: the engine's own route, then the other known ones; a
    route counts when it answers two probes with growing, non-zero counts (llama-server answers
    a body it does not understand with no tokens). Without one, prompts are measured with
    1-token completions. ``PromptError`` when neither works.
    """

    def __init__(self, client: httpx.Client, engine: object, served_name: str) -> None:
        self.client = client
        self.engine = engine
        self.served_name = served_name
        self.offset = 0
        self.calls = 0
        self.route: TokenizeRoute | None = None
        self.tried: list[str] = []
        short, longer = prompt_text("calibrate", 8), prompt_text("calibrate", 16)
        for route in known_routes(engine):
            path, body = route(short, served_name)  # type: ignore[misc]
            self.tried.append(path)
            self.calls += 1
            first = _count_of(self.client.post(path, json=body))
            if not first:
                continue
            self.calls += 1
            second = _count_of(self.client.post(path, json=route(longer, served_name)[1]))  # type: ignore[index]
            if second is not None and second > first:
                self.route, counted = route, first
                break
        try:
            used = self.usage_count(short)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                raise  # the server failing, not the tool: the cell's verdict
            code, text = exc.response.status_code, exc.response.text[:300]
            raise PromptError(self._cannot(f"a 1-token completion answered HTTP {code}: {text}")) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(self._cannot(f"its completions report no usage.prompt_tokens ({exc!r})")) from exc
        if self.route is not None:
            self.offset = used - counted

    @property
    def has_tokenizer(self) -> bool:
        return self.route is not None

    def _cannot(self, why: str) -> str:
        if self.route is not None:
            found = f"its tokenize route {self.tried[-1]} answers, but {why}"
        else:
            found = f"no tokenize route answered (tried {', '.join(self.tried) or 'none'}) and {why}"
        return f"cannot make prompts of an exact length for this server (tool error, not the server's verdict): {found}"

    def tokenize_count(self, text: str) -> int:
        path, body = self.route(text, self.served_name)  # type: ignore[misc]
        self.calls += 1
        resp = self.client.post(path, json=body)
        resp.raise_for_status()
        data = resp.json()
        return int(data["count"]) if "count" in data else len(data["tokens"])

    def usage_count(self, text: str) -> int:
        """What a completion reports as ``prompt_tokens`` for ``text`` (costs a prefill)."""
        self.calls += 1
        resp = self.client.post("/v1/completions", json={"model": self.served_name, "prompt": text, "max_tokens": 1})
        resp.raise_for_status()
        return int(resp.json()["usage"]["prompt_tokens"])

    def count(self, text: str) -> int:
        """Prompt tokens as the completion API will count them."""
        return self.tokenize_count(text) + self.offset if self.route is not None else self.usage_count(text)

    def prompts(self, uids: list[str], target: int) -> list[tuple[str, int]]:
        """One prompt per uid. The words found for the first uid are checked (one count) on the
        next ones, which usually have the same shape; only a miss searches again."""
        out: list[tuple[str, int]] = []
        shape: tuple[int, int] | None = None  # (words, pad) that fitted the last uid
        for uid in uids:
            if shape is not None:
                text = prompt_text(uid, *shape)
                n = self.count(text)
                if n == target:
                    out.append((text, n))
                    continue
            text, n = fit_prompt(uid, target, self.count)
            out.append((text, n))
            shape = _shape_of(text, uid)
        return out


def _shape_of(text: str, uid: str) -> tuple[int, int]:
    body = text[len(uid) + 2 :]
    stripped = body.rstrip(PAD)
    words = len(stripped.split()) if stripped else 0
    return words, len(body) - len(stripped)

"""Prompts of an exact token length, each with a unique prefix.

A campaign cell asks for prompts of N tokens. Text is built from a unique id (so no two
requests share a prefix and the server's prefix cache cannot make prefill look faster than it
is) plus filler words, and measured with the server's own tokenizer (``/tokenize``,
``/extras/tokenize``) until it is exactly N tokens as the completion API counts them. A server
without a tokenize API is measured the slow way: a 1-token completion and its
``usage.prompt_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from llmflow import engines

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


class PromptFactory:
    """Prompts of exact lengths for one server: its tokenizer (or usage probes), and the
    difference between what its tokenize API counts and what its completions report
    (special tokens), measured once."""

    def __init__(self, client: httpx.Client, engine: object, served_name: str) -> None:
        self.client = client
        self.engine = engine
        self.served_name = served_name
        self.offset = 0
        self.calls = 0
        self.has_tokenizer = engines.spec_for(engine).tokenize_request("x", served_name) is not None
        if self.has_tokenizer:
            probe = prompt_text("calibrate", 8)
            self.offset = self.usage_count(probe) - self.tokenize_count(probe)

    def tokenize_count(self, text: str) -> int:
        path, body = engines.spec_for(self.engine).tokenize_request(text, self.served_name)  # type: ignore[misc]
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
        return self.tokenize_count(text) + self.offset if self.has_tokenizer else self.usage_count(text)

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

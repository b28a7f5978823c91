"""OpenAI batch JSONL in and out: streamed line by line, never loaded whole.

Input lines: ``{"custom_id", "method": "POST", "url", "body"}``.
Output lines (OpenAI batch output shape, appended as each request finishes):
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.

The output file is the checkpoint: every custom_id in it is finished and is never sent again.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

EMBEDDINGS_URL = "/v1/embeddings"
SUPPORTED_URLS = ("/v1/completions", "/v1/chat/completions", EMBEDDINGS_URL)


class BatchRequest(BaseModel):
    """One input line of an OpenAI batch file."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
    body: dict[str, Any]

    @field_validator("body")
    @classmethod
    def _as_openai_means_it(cls, body: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Bodies written for OpenAI's Batch API mean the same here: a streamed answer cannot be
        stored as a line's result, and ``max_completion_tokens`` (OpenAI's newer name) is also
        given as ``max_tokens``, which llama-cpp-python needs (it ignores the newer name). An
        embeddings line without ``input`` would only be refused by the server, after its start."""
        if body.get("stream"):
            raise ValueError("stream: true is not allowed in a batch (each line's answer is stored whole)")
        if info.data.get("url") == EMBEDDINGS_URL:
            if "input" not in body:
                raise ValueError("a /v1/embeddings line needs input: a string or a list of strings or token ids")
            if not isinstance(text := body["input"], (str, list)) or not text:
                raise ValueError(
                    f"input: expected a non-empty string or list (of strings or token ids), got {_json_kind(text)}"
                )
            return body
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        return body


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: ``an empty string``, ``a number``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, (str, list)) and not value:
        return f"an empty {'string' if isinstance(value, str) else 'list'}"
    kinds = {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class ParsedLine:
    """A line of input: either a request or the reason it cannot be sent."""

    line: int
    request: BatchRequest | None = None
    error: str | None = None
    custom_id: str | None = None


def describe_validation_error(exc: ValidationError) -> str:
    """First problem of a line, naming the field: ``url: Input should be '/v1/completions' ...``."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "line"
    if err["type"] == "json_invalid":
        return f"not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"


def _guess_custom_id(raw: str) -> str | None:
    """Best effort, to name the record in an error even when the line is invalid."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    cid = data.get("custom_id") if isinstance(data, dict) else None
    return cid if isinstance(cid, str) else None


def parse_lines(path: Path) -> Iterator[ParsedLine]:
    """Yield every non-blank line of ``path`` as a request or a per-line error.

    Duplicate custom_ids are errors on the later line; the first one is kept.
    """
    seen: set[str] = set()
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is not line 1's
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                req = BatchRequest.model_validate_json(raw)
            except ValidationError as exc:
                yield ParsedLine(line=number, error=describe_validation_error(exc), custom_id=_guess_custom_id(raw))
                continue
            if req.custom_id in seen:
                yield ParsedLine(
                    line=number,
                    error=f"duplicate custom_id {req.custom_id!r} (an earlier line has it)",
                    custom_id=req.custom_id,
                )
                continue
            seen.add(req.custom_id)
            yield ParsedLine(line=number, request=req)


def count_lines(path: Path) -> int:
    """Non-blank lines, for progress totals; a streaming pass."""
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def load_finished(output_path: Path) -> set[str]:
    """custom_ids already in the output; a torn last line (killed mid-write) is cut off.

    Cutting it keeps the file valid JSONL, and its request is simply sent again.
    """
    done: set[str] = set()
    if not output_path.exists():
        return done
    with output_path.open("rb+") as f:
        good_end = 0
        for raw in f:
            if not raw.endswith(b"\n"):  # only the last line can be torn
                f.truncate(good_end)
                break
            good_end += len(raw)
            try:
                cid = json.loads(raw).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(cid, str):
                done.add(cid)
    return done


def drop_error_records(output_path: Path) -> int:
    """Rewrite the output without its error records (status >= 300), so a rerun sends those lines
    again; how many were dropped. Streamed to a temporary file beside it, then swapped in at once:
    a crash midway leaves the old file whole."""
    if not output_path.exists():
        return 0
    dropped = 0
    tmp = output_path.with_name(output_path.name + ".retry-errors.tmp")
    with output_path.open("rb") as src, tmp.open("wb") as dst:
        for raw in src:
            try:
                status = json.loads(raw)["response"]["status_code"]
            except (ValueError, KeyError, TypeError):
                status = None  # a torn or foreign line: keep it; ``load_finished`` deals with it
            if isinstance(status, int) and status >= 300:
                dropped += 1
                continue
            dst.write(raw)
    os.chmod(tmp, output_path.stat().st_mode & 0o777)
    tmp.replace(output_path)
    return dropped


def output_record(
    custom_id: str, status: int, request_id: str, body: Any, record_id: str | None = None
) -> dict[str, Any]:
    """One line of the OpenAI batch output format."""
    error = None
    if status >= 400:
        message = body.get("error", body) if isinstance(body, dict) else body
        error = {"code": str(status), "message": message if isinstance(message, str) else json.dumps(message)}
    return {
        "id": record_id or f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


_json_str = json.encoder.encode_basestring_ascii  # a str as a JSON string; what json.dumps(str) does, in C


def output_line(record_id: str, custom_id: str, status: int, request_id: str, body: Any, raw: bytes) -> bytes:
    """``output_record`` as one JSONL line, splicing the server's own bytes in as ``body``.

    Re-encoding every response body cost more than the HTTP exchange against a fast server;
    the raw bytes are used when they are one JSON object on one line (then they are exactly
    what ``json.dumps(body)`` would mean), otherwise the record is encoded as usual.
    """
    if status < 400 and isinstance(body, dict) and b"\n" not in raw:
        head = (
            f'{{"id":{_json_str(record_id)},"custom_id":{_json_str(custom_id)},'
            f'"response":{{"status_code":{int(status)},"request_id":{_json_str(request_id)},"body":'
        )
        return b"".join((head.encode(), raw.strip(), b'},"error":null}\n'))
    record = output_record(custom_id, status, request_id, body, record_id)
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class JsonlAppender:
    """Append-only JSONL writer, one unbuffered ``write`` per record.

    Each record reaches the OS in one system call, so a killed process loses at most the
    record being written, and ``load_finished`` trims a torn tail.
    """

    def __init__(self, path: Path, truncate: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        self._fd = os.open(path, flags, 0o640)
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        self.write_line((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())

    def write_line(self, line: bytes) -> None:
        """``line`` must be one complete JSON line ending in a newline."""
        os.write(self._fd, line)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def errors_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".errors.jsonl")


def summary_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".summary.json")

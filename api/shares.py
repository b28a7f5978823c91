"""A batch's input checked and split by model, and its shares' outputs merged back: pure file work.

Validation is all-or-nothing, as OpenAI's is: a file with any bad line fails the batch with
every bad line named (``errors.data``) and nothing is started. A good file is split into one
input per catalog model (a *share*), each served by its own flow run; finalizing streams the
shares' outputs into the batch's output file (answers with a 2xx) and error file (the rest, and
one record per line that never got an answer). Nothing here holds a whole file in memory.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmflow.batch.jsonl import parse_lines

MAX_REPORTED_ERRORS = 100  # errors.data entries; the last one says how many more there were
STATUS = re.compile(rb'"status_code":\s*(\d+)')  # in every output line's head, before the body

# a share's model name -> its catalog name, or raises LookupError with the message for the line
ModelLookup = Callable[[str | None], str]


@dataclass
class LineError:
    line: int
    message: str
    code: str = "invalid_request"
    param: str | None = None

    def as_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class Split:
    """What validating found: the lines, the bad ones, and how many lines each model got."""

    total: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    shares: dict[str, int] = field(default_factory=dict)

    def add_error(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)

    def openai_errors(self) -> list[dict[str, Any]]:
        data = [e.as_openai() for e in self.errors]
        if self.error_count > len(self.errors):
            data.append(
                {
                    "code": "too_many_errors",
                    "message": f"{self.error_count - len(self.errors)} more invalid lines not listed",
                    "param": None,
                    "line": None,
                }
            )
        return data


def share_slug(model: str) -> str:
    """A file name for a catalog model name (which may hold ``/`` or ``:``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model)[:80] + "-" + uuid.uuid5(uuid.NAMESPACE_URL, model).hex[:8]


def share_input(folder: Path, model: str) -> Path:
    return folder / f"{share_slug(model)}.input.jsonl"


def share_output(folder: Path, model: str) -> Path:
    return folder / f"{share_slug(model)}.output.jsonl"


def split_input(input_path: Path, lookup: ModelLookup, folder: Path, max_requests: int) -> Split:
    """Check every line of ``input_path`` and, if all are good, write one input per model into
    ``folder``. Lines must be valid requests to a supported URL (not necessarily the batch's
    ``endpoint``: one batch may mix chat, completions and embeddings), name a model ``lookup``
    knows, and be at most ``max_requests``. On any error ``folder`` is left empty."""
    split = Split()
    folder.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}
    try:
        for parsed in parse_lines(input_path):
            split.total += 1
            if parsed.request is None:
                split.add_error(LineError(parsed.line, parsed.error or "invalid line"))
                continue
            req = parsed.request
            try:
                model = lookup(req.body.get("model"))
            except LookupError as exc:
                split.add_error(
                    LineError(parsed.line, str(exc).strip("'\""), code="model_not_found", param="body.model")
                )
                continue
            if split.error_count:
                continue  # the batch fails anyway: only keep checking
            if model not in handles:
                handles[model] = share_input(folder, model).open("w", encoding="utf-8")
            handles[model].write(req.model_dump_json() + "\n")
            split.shares[model] = split.shares.get(model, 0) + 1
        if split.total > max_requests:
            split.add_error(
                LineError(
                    0, f"{split.total} requests; a batch may hold at most {max_requests}", code="too_many_requests"
                )
            )
        if split.total == 0:
            split.add_error(LineError(0, "the input file has no request lines", code="empty_file"))
    finally:
        for f in handles.values():
            f.close()
    if split.error_count:
        shutil.rmtree(folder, ignore_errors=True)
        split.shares = {}
    return split


@dataclass
class Counts:
    completed: int = 0
    failed: int = 0


def count_output(path: Path) -> Counts:
    """Answers so far in a share's output: 2xx completed, anything else failed. A streaming pass
    that reads each line's status from its head (no JSON parse); a torn last line is skipped."""
    counts = Counts()
    if not path.exists():
        return counts
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            m = STATUS.search(raw)
            if m is None:
                continue
            if int(m.group(1)) < 300:
                counts.completed += 1
            else:
                counts.failed += 1
    return counts


UNANSWERED = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


def merge_outputs(
    shares: list[tuple[Path, Path]], output_path: Path, error_path: Path, final_status: str, reasons: dict[Path, str]
) -> Counts:
    """Stream each share's output into ``output_path`` (2xx answers) and ``error_path`` (other
    answers, then one record per input line without any answer). ``shares`` pairs each share's
    input with its output; ``reasons`` gives, per share input, why its unanswered lines got none
    (a failed flow run's message) when the batch did not expire or get cancelled. Empty files
    are removed. Returns the final request counts."""
    counts = Counts()
    with output_path.open("wb") as out, error_path.open("wb") as err:
        for share_in, share_out in shares:
            answered: set[str] = set()
            if share_out.exists():
                with share_out.open("rb") as f:
                    for raw in f:
                        if not raw.endswith(b"\n"):
                            break  # a torn last line: its request counts as unanswered
                        try:
                            custom_id = json.loads(raw)["custom_id"]
                        except (ValueError, KeyError, TypeError):
                            continue
                        if custom_id in answered:
                            continue
                        answered.add(custom_id)
                        m = STATUS.search(raw)
                        if m is not None and int(m.group(1)) < 300:
                            out.write(raw)
                            counts.completed += 1
                        else:
                            err.write(raw)
                            counts.failed += 1
            code, message = UNANSWERED.get(
                final_status, ("request_not_served", reasons.get(share_in) or "The model server never answered it.")
            )
            with share_in.open("rb") as f:
                for raw in f:
                    custom_id = json.loads(raw)["custom_id"]
                    if custom_id in answered:
                        continue
                    record = {
                        "id": f"batch_req_{uuid.uuid4().hex}",
                        "custom_id": custom_id,
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                    err.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
                    counts.failed += 1
    for path in (output_path, error_path):
        if path.stat().st_size == 0:
            path.unlink()
    return counts


def remove_copies(folder: Path) -> None:
    """Once a batch is final, its shares' inputs and outputs (copies of what the input file and
    the merged files hold) go; the flow runs' summaries and error lists stay for a post-mortem."""
    for path in [*folder.glob("*.input.jsonl"), *folder.glob("*.output.jsonl")]:
        path.unlink(missing_ok=True)

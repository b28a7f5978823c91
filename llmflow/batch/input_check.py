"""Is the input file something the batch can send? Checked before any server is started.

A missing file, a JSON array, a CSV or Parquet file, or a file without one valid request line
would otherwise start a server (or queue a Slurm job) only to send nothing. The scan stops at
the first valid line, so a large file costs one line's parse; the pass itself reports every
invalid line later.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from llmflow.batch.jsonl import parse_lines
from llmflow.errors import ConfigError

FORMAT = 'the input is OpenAI batch JSONL, one {"custom_id", "method": "POST", "url", "body"} object per line'
MAX_SNIFF = 4096


def _sniff(path: Path, head: bytes) -> str | None:
    """What the file is when it is not JSONL, and what to do, from its first bytes and its name."""
    text, suffix = head.removeprefix(codecs.BOM_UTF8).lstrip(), path.suffix.lower()
    if head.startswith(b"PAR1") or suffix == ".parquet":
        return f"a Parquet file, not JSONL; {FORMAT}"
    if text.startswith(b"["):
        return f"a JSON array, not JSONL; write one object per line: jq -c '.[]' {path.name} > {path.stem}.jsonl"
    first = text.split(b"\n", 1)[0]
    if suffix in (".csv", ".tsv") or (first and not first.startswith(b"{") and (b"," in first or b"\t" in first)):
        return f"a CSV table, not JSONL; {FORMAT}"
    return None


def check_input(path: Path) -> None:
    """Raise ``ConfigError`` (one line, naming the file) unless ``path`` has a valid request line."""
    if not path.exists():
        raise ConfigError(f"input {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"input {path}: not a file")
    with path.open("rb") as f:
        head = f.read(MAX_SNIFF)
    if problem := _sniff(path, head):
        raise ConfigError(f"input {path}: {problem}")
    first_error = None
    for parsed in parse_lines(path):
        if parsed.request is not None:
            return
        first_error = first_error or f"line {parsed.line}: {parsed.error}"
    if first_error is None:
        raise ConfigError(f"input {path}: empty; {FORMAT}")
    raise ConfigError(f"input {path}: no valid request line (first problem: {first_error}); {FORMAT}")

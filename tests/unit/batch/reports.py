"""A ``BatchReport`` with every count given, for the report and summary tests."""

from __future__ import annotations

from pathlib import Path

from llmflow.results import BatchReport


def batch_report(tmp_path: Path, **counts) -> BatchReport:
    """Ten lines, all sent and answered 2xx in a second; ``counts`` overrides any field."""
    base = dict(
        input_path=tmp_path / "in.jsonl",
        output_path=tmp_path / "o.jsonl",
        errors_path=tmp_path / "o.errors.jsonl",
        input_lines=10,
        already_done=0,
        sent=10,
        succeeded=10,
        failed_http=0,
        unfinished=0,
        invalid_lines=0,
        prompt_tokens=0,
        completion_tokens=0,
        wall_s=1.0,
        retries=0,
    )
    return BatchReport(**{**base, **counts})

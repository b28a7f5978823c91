"""The batch flow's output path resolution outside a flow run (inside one: tests/integration/test_nightly.py)."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.batch import resolve_output_path, schedule_timezone
from llmflow.config import BatchConfig


def test_outside_a_flow_run_the_date_is_today_in_utc(tmp_path: Path):
    before = datetime.now(UTC).strftime("%Y-%m-%d")
    resolved = resolve_output_path(BatchConfig(output_path=tmp_path / "n-{date}.jsonl")).output_path
    after = datetime.now(UTC).strftime("%Y-%m-%d")
    assert resolved.name in {f"n-{before}.jsonl", f"n-{after}.jsonl"}
    assert schedule_timezone(None) is UTC


def test_outside_a_flow_run_a_run_placeholder_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match=r"\{flow_run_name\} needs a flow run"):
        resolve_output_path(BatchConfig(output_path=tmp_path / "{flow_run_name}.jsonl"))

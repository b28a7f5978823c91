"""Placeholders in batch.output_path: rendering, and refusal of unknown ones at validation."""

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmflow.batch.output_path import placeholders, render
from llmflow.config import BatchConfig

WHEN = datetime(2026, 3, 1, 2, 5, 9, tzinfo=UTC)


def test_date_and_time_come_from_the_given_moment():
    assert render(Path("out/nightly-{date}.jsonl"), WHEN, None, None) == Path("out/nightly-2026-03-01.jsonl")
    assert render(Path("out/{date}/{time}.jsonl"), WHEN, None, None) == Path("out/2026-03-01/020509.jsonl")


def test_the_moment_is_named_in_its_own_timezone():
    """The caller converts to the schedule's zone: 23:30 UTC is the next day in Berlin (UTC+1)."""
    late = datetime(2026, 2, 28, 23, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=1)))
    assert render(Path("n-{date}-{time}.jsonl"), late, None, None) == Path("n-2026-03-01-003000.jsonl")


def test_flow_run_name_and_id_and_a_slash_in_the_name_makes_no_folder():
    path = render(Path("out/{flow_run_name}_{flow_run_id}.jsonl"), WHEN, "nightly/happy-cat", "abc-123")
    assert path == Path("out/nightly-happy-cat_abc-123.jsonl")


def test_a_path_without_placeholders_is_unchanged_and_doubled_braces_are_literal():
    assert render(Path("/data/out.jsonl"), WHEN, None, None) == Path("/data/out.jsonl")
    assert render(Path("out/{{x}}-{date}.jsonl"), WHEN, None, None) == Path("out/{x}-2026-03-01.jsonl")


def test_a_run_placeholder_outside_a_flow_run_is_an_error():
    with pytest.raises(ValueError, match=r"\{flow_run_id\} needs a flow run"):
        render(Path("out/{flow_run_id}.jsonl"), WHEN, None, None)


def test_placeholders_lists_the_names_used():
    assert placeholders("a/{date}/{flow_run_name}-{time}.jsonl") == ["date", "flow_run_name", "time"]


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("out/nightly-{dat}.jsonl", "unknown placeholder {dat}"),
        ("out/{flow_run}.jsonl", "did you mean {flow_run_id}?"),
        ("out/{DATE}.jsonl", "did you mean {date}?"),
        ("out/{}.jsonl", "unknown placeholder {}"),
        ("out/{date:%Y}.jsonl", "takes no format spec"),
        ("out/{date.jsonl", "expected '}'"),
    ],
)
def test_batch_config_refuses_unknown_placeholders_naming_the_field_and_the_known_names(path, says):
    with pytest.raises(ValidationError) as exc:
        BatchConfig(output_path=path)
    message = str(exc.value)
    assert "batch.output_path" in message and says in message
    if "unknown" in says:
        assert "known: {date}, {time}, {flow_run_name}, {flow_run_id}" in message


def test_an_unknown_placeholder_far_from_any_name_gets_no_guess():
    with pytest.raises(ValidationError) as exc:
        BatchConfig(output_path="out/{zzzzzz}.jsonl")
    assert "did you mean" not in str(exc.value)


def test_batch_config_accepts_the_known_placeholders():
    template = "out/{date}-{time}-{flow_run_name}-{flow_run_id}.jsonl"
    assert BatchConfig(output_path=template).output_path == Path(template)

"""The input is checked before any server starts: each way it can be wrong gets its own message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow.batch.input_check import check_input
from llmflow.errors import ConfigError

REQUEST = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        check_input(path)
    message = str(info.value)
    assert message.startswith(f"input {path}:") and "\n" not in message
    return message


def test_a_missing_file_or_a_folder(tmp_path: Path):
    assert "no such file" in refused(tmp_path / "nope.jsonl")
    assert "not a file" in refused(tmp_path)


def test_a_json_array_says_how_to_make_jsonl(tmp_path: Path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([REQUEST, REQUEST]))
    assert "a JSON array, not JSONL" in refused(path) and "jq -c '.[]'" in refused(path)


def test_csv_and_parquet_are_named(tmp_path: Path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,max_tokens\nhello,4\n")
    assert "a CSV table, not JSONL" in refused(csv)
    noname = tmp_path / "prompts.txt"
    noname.write_text("id,prompt\n1,hello\n")
    assert "a CSV table" in refused(noname)
    parquet = tmp_path / "p.parquet"
    parquet.write_bytes(b"PAR1" + b"\0" * 20)
    assert "a Parquet file" in refused(parquet)


def test_empty_and_all_invalid_files(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "empty" in refused(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**REQUEST, "url": "/v1/moderations"}) + "\n" + json.dumps({"custom_id": "b"}) + "\n")
    assert "no valid request line (first problem: line 1: url:" in refused(bad)


def test_one_valid_line_is_enough_and_bad_lines_around_it_are_the_passs_business(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("{not json\n" + json.dumps(REQUEST) + "\n")
    check_input(path)


def test_a_byte_order_mark_is_not_a_problem(tmp_path: Path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(REQUEST).encode() + b"\n")
    check_input(path)
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([REQUEST]).encode())
    assert "a JSON array" in refused(array)

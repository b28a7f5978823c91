"""The API's file work: validating and splitting an input by model, counting and merging outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api import shares


def _line(cid: str, model: str | None = "a", url: str = "/v1/chat/completions") -> str:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _lookup(name: str | None) -> str:
    if name in ("a", "b"):
        return name
    raise LookupError(f"model {name!r} is not in the catalog (one of a, b)")


def test_split_writes_one_input_per_model(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([_line("1", "a"), _line("2", "b", "/v1/completions"), _line("3", "a")]) + "\n\n")
    split = shares.split_input(src, _lookup, tmp_path / "batch", 10)
    assert (split.total, split.error_count, split.shares) == (3, 0, {"a": 2, "b": 1})
    a = [json.loads(x)["custom_id"] for x in shares.share_input(tmp_path / "batch", "a").read_text().splitlines()]
    assert a == ["1", "3"]


def test_split_names_every_bad_line_and_writes_nothing(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([_line("1"), "{oops", _line("3", "gpt-9"), _line("1"), _line("5", None)]) + "\n")
    split = shares.split_input(src, _lookup, tmp_path / "batch", 10)
    errors = {e["line"]: e for e in split.openai_errors()}
    assert set(errors) == {2, 3, 4, 5}
    assert "not valid JSON" in errors[2]["message"]
    assert errors[3]["code"] == "model_not_found" and "'gpt-9'" in errors[3]["message"]
    assert "duplicate custom_id" in errors[4]["message"]
    assert errors[5]["param"] == "body.model"
    assert not (tmp_path / "batch").exists()


def test_split_limits(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(_line(str(i)) + "\n" for i in range(5)))
    assert shares.split_input(src, _lookup, tmp_path / "b1", 4).openai_errors()[0]["code"] == "too_many_requests"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert shares.split_input(tmp_path / "empty.jsonl", _lookup, tmp_path / "b2", 4).errors[0].code == "empty_file"


def test_many_bad_lines_are_summed_up_after_the_first_hundred(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text("{\n" * 150)
    data = shares.split_input(src, _lookup, tmp_path / "b", 1000).openai_errors()
    assert len(data) == shares.MAX_REPORTED_ERRORS + 1 and "50 more" in data[-1]["message"]


def _out(cid: str, status: int) -> str:
    return json.dumps(
        {
            "id": "x",
            "custom_id": cid,
            "response": {"status_code": status, "request_id": "r", "body": {}},
            "error": None,
        },
        separators=(",", ":"),
    )


@pytest.mark.parametrize("final, code", [("cancelled", "batch_cancelled"), ("expired", "batch_expired")])
def test_merge_splits_answers_and_names_what_never_got_one(tmp_path: Path, final: str, code: str):
    share_in, share_out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    share_in.write_text("".join(_line(str(i)) + "\n" for i in range(5)))
    share_out.write_text(_out("0", 200) + "\n" + _out("1", 400) + "\n" + _out("0", 200) + "\n" + _out("2", 200))
    counts = shares.count_output(share_out)  # the torn last line is not counted
    assert (counts.completed, counts.failed) == (2, 1)
    merged = shares.merge_outputs([(share_in, share_out)], tmp_path / "o", tmp_path / "e", final, {})
    assert (merged.completed, merged.failed) == (1, 4)  # the duplicate of 0 once, 2's torn line unanswered
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "o").read_text().splitlines()] == ["0"]
    errors = [json.loads(x) for x in (tmp_path / "e").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["1", "2", "3", "4"]
    assert [e["error"]["code"] for e in errors[1:]] == [code] * 3 and errors[1]["response"] is None


def test_merge_of_a_failed_share_gives_the_flow_runs_reason_and_drops_empty_files(tmp_path: Path):
    share_in = tmp_path / "in.jsonl"
    share_in.write_text(_line("0") + "\n")
    reasons = {share_in: "flow run f ended FAILED: server died"}
    counts = shares.merge_outputs(
        [(share_in, tmp_path / "none.jsonl")], tmp_path / "o", tmp_path / "e", "completed", reasons
    )
    assert (counts.completed, counts.failed) == (0, 1)
    assert not (tmp_path / "o").exists()
    assert json.loads((tmp_path / "e").read_text())["error"] == {
        "code": "request_not_served",
        "message": "flow run f ended FAILED: server died",
    }

"""What a pass would send, counted before a server is asked for."""

import json
from pathlib import Path

from llmflow.batch.jsonl import drop_error_records
from llmflow.batch.pending import count_pending


def _line(cid: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": cid}}) + "\n"


def _record(cid: str, status: int = 200) -> str:
    return json.dumps({"id": "x", "custom_id": cid, "response": {"status_code": status, "body": {}}}) + "\n"


def _input(tmp_path: Path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text(_line("a") + _line("b") + "not json\n" + _line("a") + "\n" + _line("c"))
    return src


def test_no_output_yet_means_every_valid_request_is_to_send(tmp_path: Path):
    p = count_pending(_input(tmp_path), tmp_path / "out.jsonl")
    assert (p.input_lines, p.requests, p.invalid_lines, p.finished, p.to_send) == (5, 3, 2, 0, 3)


def test_finished_custom_ids_are_not_to_send_and_ids_not_in_the_input_do_not_count(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text(_record("a") + _record("c") + _record("zzz"))
    p = count_pending(_input(tmp_path), out)
    assert (p.finished, p.to_send) == (3, 1)
    out.write_text(_record("a") + _record("b") + _record("c"))
    assert count_pending(_input(tmp_path), out).to_send == 0


def test_a_torn_last_record_is_sent_again(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text(_record("a") + _record("b") + _record("c")[:-10])
    assert count_pending(_input(tmp_path), out).to_send == 1


def test_error_records_taken_out_by_retry_errors_count_as_to_send(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text(_record("a") + _record("b", 500) + _record("c", 404))
    assert count_pending(_input(tmp_path), out).to_send == 0  # without retry_errors an error answer is final
    assert drop_error_records(out) == 2
    assert count_pending(_input(tmp_path), out).to_send == 2


def test_embeddings_lines_to_send_are_counted(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    emb = [
        json.dumps({"custom_id": c, "method": "POST", "url": "/v1/embeddings", "body": {"input": c}}) + "\n"
        for c in ("e1", "e2", "e3")
    ]
    src.write_text(_line("a") + "".join(emb) + json.dumps({"custom_id": "bad", "url": "/v1/embeddings"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(_record("e1"))
    p = count_pending(src, out)
    assert (p.to_send, p.embeddings_to_send, p.invalid_lines) == (3, 2, 1)

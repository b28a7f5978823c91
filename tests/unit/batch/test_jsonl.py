import json
from pathlib import Path

from llmflow.batch.jsonl import BatchRequest, JsonlAppender, count_lines, load_finished, output_record, parse_lines


def _line(cid, url="/v1/completions", **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"prompt": "x"}, **extra})


def test_per_line_errors_with_line_numbers(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(
            [
                _line("a"),
                "{not json",
                _line("b", url="/v1/embeddings"),
                "",
                _line("a"),
                json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions"}),
                _line("d", url="/v1/chat/completions"),
            ]
        )
        + "\n"
    )
    parsed = list(parse_lines(src))
    ok = [p.request.custom_id for p in parsed if p.request]
    errors = {p.line: p.error for p in parsed if p.error}
    assert ok == ["a", "d"]
    assert set(errors) == {2, 3, 5, 6}
    assert "not valid JSON" in errors[2]
    assert errors[3].startswith("body: a /v1/embeddings line needs input")  # its body is a completion's
    assert "duplicate custom_id 'a'" in errors[5]
    assert errors[6].startswith("body:")
    assert count_lines(src) == 6  # blank line not counted


def test_error_names_custom_id_when_readable(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "z", "method": "GET", "url": "/v1/completions", "body": {}}) + "\n")
    (p,) = list(parse_lines(src))
    assert p.custom_id == "z" and p.error.startswith("method:")


def test_load_finished_trims_a_torn_last_line(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    good = json.dumps(output_record("a", 200, "r1", {"ok": 1})) + "\n"
    out.write_text(good + '{"id": "x", "custom_id": "b", "resp')
    assert load_finished(out) == {"a"}
    assert out.read_text() == good  # the torn tail is gone, the file is valid JSONL again


def test_load_finished_keeps_lines_after_a_bad_one(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a"}\nnot json\n{"custom_id": "b"}\n')
    assert load_finished(out) == {"a", "b"}
    assert out.read_text().count("\n") == 3


def test_output_record_shape():
    ok = output_record("a", 200, "req-1", {"choices": []})
    assert set(ok) == {"id", "custom_id", "response", "error"}
    assert ok["response"] == {"status_code": 200, "request_id": "req-1", "body": {"choices": []}}
    assert ok["error"] is None and ok["id"].startswith("batch_req_")
    bad = output_record("b", 400, "req-2", {"error": {"message": "too long"}})
    assert bad["error"]["code"] == "400" and "too long" in bad["error"]["message"]


def test_appender_appends_and_truncates(tmp_path: Path):
    path = tmp_path / "sub" / "o.jsonl"
    with JsonlAppender(path) as w:
        w.write({"a": 1})
    with JsonlAppender(path) as w:
        w.write({"a": 2})
    assert [json.loads(x)["a"] for x in path.read_text().splitlines()] == [1, 2]
    with JsonlAppender(path, truncate=True) as w:
        w.write({"a": 3})
    assert path.read_text() == '{"a":3}\n'


def test_output_line_splices_raw_body_and_stays_valid_json():
    from llmflow.batch.jsonl import output_line

    body = {"choices": [{"text": "a\\nb \u00e9"}], "usage": {"completion_tokens": 2}}
    raw = json.dumps(body).encode() + b" "
    line = output_line("batch_req_1", 'id "q"', 200, "r1", body, raw)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == output_record('id "q"', 200, "r1", body, "batch_req_1")
    # a pretty-printed body (newlines inside) and an error are re-encoded instead
    pretty = json.dumps(body, indent=2).encode()
    assert json.loads(output_line("x", "c", 200, "r", body, pretty))["response"]["body"] == body
    err = json.loads(output_line("x", "c", 400, "r", {"error": "no"}, b'{"error": "no"}'))
    assert err["error"] == {"code": "400", "message": "no"}


def test_drop_error_records_keeps_answers_and_foreign_lines(tmp_path: Path):
    from llmflow.batch.jsonl import drop_error_records

    out = tmp_path / "out.jsonl"
    lines = [
        output_record("a", 200, "r1", {"ok": True}),
        output_record("b", 404, "r2", {"error": {"message": "no such model"}}),
        output_record("c", 500, "r3", {"error": "boom"}),
        output_record("d", 201, "r4", {}),
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
    out.chmod(0o640)
    assert drop_error_records(out) == 2
    kept = out.read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in kept[:-1]] == ["a", "d"] and kept[-1] == "not json"
    assert load_finished(out) == {"a", "d"}  # b and c are sent again
    assert out.stat().st_mode & 0o777 == 0o640 and not list(tmp_path.glob("*.tmp"))
    assert drop_error_records(tmp_path / "missing.jsonl") == 0


def _chat_line(**body) -> str:
    return json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_a_file_written_for_openais_batch_api_means_the_same_here(tmp_path: Path):
    """A byte-order mark does not cost the first request; max_completion_tokens is also sent as
    max_tokens (llama-cpp-python ignores the newer name: asked for 8, it gave 51); a streamed
    answer cannot be a line's stored result, so stream: true is that line's input error."""
    path = tmp_path / "openai.jsonl"
    path.write_bytes(
        "\ufeff".encode()
        + "\n".join(
            [
                _chat_line(model="m", max_completion_tokens=8),
                _chat_line(model="m", max_completion_tokens=8, max_tokens=4),
                _chat_line(model="m", stream=True).replace("c1", "c3"),
            ]
        ).encode()
        + b"\n"
    )
    first, second, third = list(parse_lines(path))
    assert first.request is not None and first.request.body["max_tokens"] == 8
    assert second.error and "duplicate" in second.error  # same id: parsed fine, refused as a duplicate
    assert (
        third.request is None
        and third.error == "body: stream: true is not allowed in a batch (each line's answer is stored whole)"
    )
    explicit = BatchRequest.model_validate_json(_chat_line(max_completion_tokens=8, max_tokens=4))
    assert explicit.body["max_tokens"] == 4  # an explicit max_tokens is kept


def _embeddings_line(cid: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", **body}})


def test_embeddings_lines_need_a_non_empty_string_or_list_input(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    lines = [
        _embeddings_line("s", input="hello"),
        _embeddings_line("l", input=["a", "b"]),
        _embeddings_line("t", input=[1, 2, 3]),
        _embeddings_line("missing"),
        _embeddings_line("empty", input=""),
        _embeddings_line("number", input=3),
        _embeddings_line("null", input=None),
        _embeddings_line("max", input="x", max_completion_tokens=4),
        _line("other", url="/v1/nope"),
    ]
    src.write_text("\n".join(lines) + "\n")
    parsed = {p.custom_id or p.request.custom_id: p for p in parse_lines(src)}
    assert {cid for cid, p in parsed.items() if p.request} == {"s", "l", "t", "max"}
    assert parsed["missing"].error == (
        "body: a /v1/embeddings line needs input: a string or a list of strings or token ids"
    )
    expected = "body: input: expected a non-empty string or list (of strings or token ids), got "
    assert parsed["empty"].error == expected + "an empty string"
    assert parsed["number"].error == expected + "a number"
    assert parsed["null"].error == expected + "null"
    assert "max_tokens" not in parsed["max"].request.body  # an embedding has no output length
    assert parsed["other"].error == "url: Input should be '/v1/completions', '/v1/chat/completions' or '/v1/embeddings'"

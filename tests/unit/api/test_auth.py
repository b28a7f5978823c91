"""Keys: no key, a wrong key and a revoked key are 401; a key sees only its own files and
batches, and another key's id is answered exactly as an id that does not exist."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.unit.api.conftest import write_jsonl


def test_no_key_is_a_401_in_openais_shape(service):
    with service.http() as http:
        answer = http.get("/v1/files")
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert set(answer.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize("secret", ["llmflow-not-a-key-at-all-0123456789", "sk-something-else", "x"])
def test_a_wrong_key_is_a_401(service, secret):
    with pytest.raises(openai.AuthenticationError) as exc:
        service.client(secret).files.list()
    assert exc.value.code == "invalid_api_key"
    assert secret not in exc.value.message or len(secret) < 16  # the key is masked in the message


def test_a_revoked_key_is_refused_from_its_next_request(service):
    key_id, secret = service.new_key("soon revoked")
    client = service.client(secret)
    assert list(client.batches.list()) == []
    service.revoke(key_id)
    with pytest.raises(openai.AuthenticationError):
        client.batches.list()


def test_another_keys_files_and_batches_are_not_found(service, tmp_path: Path):
    a, b = service.client(service.new_key("a")[1]), service.client(service.new_key("b")[1])
    file = a.files.create(file=write_jsonl(tmp_path / "in.jsonl").open("rb"), purpose="batch")
    batch = a.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

    assert list(b.files.list()) == [] and list(b.batches.list()) == []
    for call, arg in [
        (b.files.retrieve, file.id),
        (b.files.content, file.id),
        (b.files.delete, file.id),
        (b.batches.retrieve, batch.id),
        (b.batches.cancel, batch.id),
    ]:
        with pytest.raises(openai.NotFoundError) as foreign:
            call(arg)
        missing_id = arg[:-4] + "0000" if not arg.endswith("0000") else arg[:-4] + "1111"
        with pytest.raises(openai.NotFoundError) as missing:
            call(missing_id)
        expected = {**missing.value.body, "message": missing.value.body["message"].replace(missing_id, arg)}
        assert foreign.value.body == expected

    with pytest.raises(openai.BadRequestError) as exc:
        b.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert exc.value.param == "input_file_id"
    with pytest.raises(openai.BadRequestError) as exc:
        b.batches.list(after=batch.id)
    assert exc.value.param == "after"

    # A's things are untouched by B's attempts
    assert a.files.content(file.id).content == (tmp_path / "in.jsonl").read_bytes()
    assert a.batches.retrieve(batch.id).status == "validating"


def test_models_lists_nothing_without_a_catalog_and_needs_a_key(service, client):
    assert client.models.list().data == []
    assert service.http().get("/v1/models").status_code == 401

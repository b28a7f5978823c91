"""Batches: create (and what is refused), retrieve, list pages, cancel, with the official SDK."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.unit.api.conftest import write_jsonl

BATCH_KEYS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata",
}  # fmt: skip


@pytest.fixture
def input_file(client: openai.OpenAI, tmp_path: Path) -> str:
    return client.files.create(file=write_jsonl(tmp_path / "in.jsonl").open("rb"), purpose="batch").id


def _create(client: openai.OpenAI, input_file: str, **kwargs):
    args = {"input_file_id": input_file, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kwargs}
    return client.batches.create(**args)


def test_a_created_batch_is_validating_with_its_window_and_metadata(service, client, key, input_file):
    batch = _create(client, input_file, metadata={"team": "nlp", "run": "7"})
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert (batch.status, batch.endpoint, batch.input_file_id, batch.completion_window) == (
        "validating",
        "/v1/chat/completions",
        input_file,
        "24h",
    )
    assert batch.expires_at == batch.created_at + 86400
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (0, 0, 0)
    assert batch.metadata == {"team": "nlp", "run": "7"} and batch.errors is None and batch.output_file_id is None
    assert client.batches.retrieve(batch.id) == batch
    with service.http(key) as http:
        raw = http.get(f"/v1/batches/{batch.id}").json()
    assert set(raw) == BATCH_KEYS and set(raw["request_counts"]) == {"total", "completed", "failed"}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"endpoint": "/v1/responses"}, "endpoint"),
        ({"input_file_id": "file-doesnotexist"}, "input_file_id"),
        ({"completion_window": "30m"}, "completion_window"),  # below the fixture's 1h
        ({"completion_window": "8d"}, "completion_window"),  # above its 7d
        ({"completion_window": "one day"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"extra_body": {"model": "x"}}, "model"),
    ],
)
def test_what_a_batch_cannot_be_is_a_400_naming_the_parameter(client, input_file, change, param):
    with pytest.raises(openai.BadRequestError) as exc:
        _create(client, input_file, **change)
    assert exc.value.param == param, exc.value.message
    assert list(client.batches.list()) == []


def test_the_window_error_says_what_is_allowed(client, input_file):
    with pytest.raises(openai.BadRequestError) as exc:
        _create(client, input_file, completion_window="8d")
    assert "1h" in exc.value.message and "7d" in exc.value.message
    assert _create(client, input_file, completion_window="7d").completion_window == "7d"
    assert _create(client, input_file, completion_window="60m").expires_at > 0


def test_a_body_that_does_not_validate_is_a_400_not_a_422(service, key):
    with service.http(key) as http:
        missing = http.post("/v1/batches", json={"input_file_id": "file-x", "completion_window": "24h"})
        not_json = http.post("/v1/batches", content=b"{", headers={"Content-Type": "application/json"})
        bad_limit = http.get("/v1/batches", params={"limit": 101})
        no_route = http.get("/v1/nothing")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "endpoint"
    assert "Missing required parameter" in missing.json()["error"]["message"]
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["param"] == "limit"
    assert no_route.status_code == 404 and set(no_route.json()["error"]) == {"message", "type", "param", "code"}


def test_list_is_newest_first_in_pages(client, input_file):
    made = [_create(client, input_file).id for _ in range(5)]
    pages, after = [], openai.NOT_GIVEN
    while True:
        page = client.batches.list(limit=2, after=after)
        pages.append(page)
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [len(p.data) for p in pages] == [2, 2, 1]
    assert [p.has_more for p in pages] == [True, True, False]
    listed = [b for p in pages for b in p.data]
    assert sorted(b.id for b in listed) == sorted(made)
    assert [b.created_at for b in listed] == sorted((b.created_at for b in listed), reverse=True)
    assert [b.id for b in client.batches.list(limit=2)] == [b.id for b in listed]  # the SDK's own paging
    assert client.batches.list().data == listed  # default limit 20


def test_cancel_moves_validating_to_cancelling_once(service, client, input_file):
    batch = _create(client, input_file)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert cancelling.cancelling_at >= batch.created_at and cancelling.cancelled_at is None
    again = client.batches.cancel(batch.id)
    assert (again.status, again.cancelling_at) == ("cancelling", cancelling.cancelling_at)
    assert client.batches.retrieve(batch.id) == cancelling

    running = _create(client, input_file)
    service.set_status(running.id, "in_progress")
    assert client.batches.cancel(running.id).status == "cancelling"


@pytest.mark.parametrize("status", ["finalizing", "completed", "failed", "expired", "cancelled"])
def test_cancel_of_a_batch_past_cancelling_is_a_409(service, client, input_file, status):
    batch = _create(client, input_file)
    service.set_status(batch.id, status)
    with pytest.raises(openai.ConflictError) as exc:
        client.batches.cancel(batch.id)
    assert status in exc.value.message
    assert client.batches.retrieve(batch.id).status == status

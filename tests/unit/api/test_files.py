"""Files: upload, list, retrieve, download, delete, with the official SDK; the limits."""

from __future__ import annotations

import stat
from pathlib import Path

import openai
import pytest

from tests.unit.api.conftest import MAX_FILE_BYTES, write_jsonl

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at"}


def test_upload_list_retrieve_download_delete_round_trip(service, client, key, tmp_path: Path):
    source = write_jsonl(tmp_path / "requests.jsonl", lines=50)
    with source.open("rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.object == "file" and created.id.startswith("file-")
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        source.stat().st_size,
        "requests.jsonl",
        "batch",
        "processed",
    )
    with service.http(key) as http:
        raw = http.get(f"/v1/files/{created.id}").json()
    assert set(raw) == FILE_KEYS and raw["status_details"] is None and raw["expires_at"] is None

    assert client.files.retrieve(created.id) == created
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.content(created.id).content == source.read_bytes()

    on_disk = service.settings.files_dir / created.id
    assert stat.S_IMODE(on_disk.stat().st_mode) == 0o600
    assert stat.S_IMODE(service.settings.files_dir.stat().st_mode) == 0o700

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert not on_disk.exists()
    for gone in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            gone(created.id)
    assert list(client.files.list()) == []


def test_list_orders_pages_and_filters(client, tmp_path: Path):
    source = write_jsonl(tmp_path / "in.jsonl")
    ids = [client.files.create(file=source.open("rb"), purpose="batch").id for _ in range(4)]
    newest_first = [f.id for f in client.files.list()]
    assert sorted(newest_first) == sorted(ids)
    assert [f.id for f in client.files.list(order="asc")] == newest_first[::-1]
    page = client.files.list(limit=3)
    assert [f.id for f in page.data] == newest_first[:3] and page.has_more
    rest = client.files.list(limit=3, after=page.data[-1].id)
    assert [f.id for f in rest.data] == newest_first[3:] and not rest.has_more
    assert list(client.files.list(purpose="batch_output")) == []
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.list(limit=10_001)
    assert exc.value.param == "limit"


def test_only_purpose_batch_is_accepted_and_nothing_is_left_behind(service, client, tmp_path: Path):
    before = service.files_on_disk()
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=write_jsonl(tmp_path / "in.jsonl").open("rb"), purpose="fine-tune")
    assert exc.value.param == "purpose"
    assert service.files_on_disk() == before


def test_an_upload_past_the_limit_is_refused_and_leaves_no_file(service, client, tmp_path: Path):
    before = service.files_on_disk()
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=big.open("rb"), purpose="batch")
    assert exc.value.param == "file" and str(MAX_FILE_BYTES) in exc.value.message
    assert service.files_on_disk() == before
    assert list(client.files.list()) == []
    exactly = tmp_path / "exactly.jsonl"
    exactly.write_bytes(b"y" * MAX_FILE_BYTES)
    assert client.files.create(file=exactly.open("rb"), purpose="batch").bytes == MAX_FILE_BYTES


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_purpose_may_come_after_the_file_and_a_path_in_the_filename_is_dropped(service, key):
    body, content_type = _multipart([("file", "C:\\Users\\me\\in.jsonl", b"{}\n"), ("purpose", None, b"batch")])
    with service.http(key) as http:
        answer = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["filename"], answer.json()["bytes"]) == ("in.jsonl", 3)


@pytest.mark.parametrize(
    ("parts", "param"),
    [
        ([("purpose", None, b"batch")], "file"),
        ([("file", "in.jsonl", b"{}\n")], "purpose"),
        ([("purpose", None, b"batch"), ("other", "x.jsonl", b"{}\n")], "other"),
    ],
)
def test_a_form_without_its_fields_is_a_400_naming_the_field(service, key, parts, param):
    before = service.files_on_disk()
    body, content_type = _multipart(parts)
    with service.http(key) as http:
        answer = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert service.files_on_disk() == before


def test_a_body_that_is_not_multipart_is_a_400(service, key):
    with service.http(key) as http:
        answer = http.post("/v1/files", json={"purpose": "batch"})
        truncated = http.post(
            "/v1/files",
            content=_multipart([("purpose", None, b"batch"), ("file", "a.jsonl", b"{}\n")])[0][:-30],
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        )
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    assert truncated.status_code == 400 and truncated.json()["error"]["param"] == "file"

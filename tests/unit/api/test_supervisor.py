"""The supervisor's lifecycle against a stand-in for Prefect's client (the real one runs in
tests/integration/test_api_service.py): which flow runs it starts, resumes and cancels, and the
states, counts and files a batch ends with."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.client.schemas.objects import StateType
from sqlalchemy.orm.exc import StaleDataError

from api import db, shares
from api.settings import ApiSettings
from api.supervisor import DEFAULT_SHARE, Catalogued, Supervisor


class FakePrefect:
    """Flow runs as a dict of states; the test moves them as a worker would."""

    def __init__(self) -> None:
        self.runs: dict[uuid.UUID, StateType] = {}
        self.keys: dict[str, uuid.UUID] = {}
        self.parameters: dict[uuid.UUID, dict] = {}
        self.tags: dict[uuid.UUID, list[str]] = {}
        self.stuck_since: datetime | None = None  # set: a cancel leaves runs Cancelling since then

    async def read_deployment_by_name(self, name: str):
        return SimpleNamespace(id=uuid.uuid4())

    async def create_flow_run_from_deployment(self, deployment_id, *, parameters, name, tags, idempotency_key):
        if idempotency_key not in self.keys:
            run_id = uuid.uuid4()
            self.keys[idempotency_key], self.runs[run_id] = run_id, StateType.SCHEDULED
            self.parameters[run_id], self.tags[run_id] = parameters, tags
        run_id = self.keys[idempotency_key]
        return SimpleNamespace(id=run_id, state_type=self.runs[run_id])

    async def read_flow_run(self, run_id):
        return SimpleNamespace(
            state=SimpleNamespace(type=self.runs[run_id], message=f"state {self.runs[run_id].value}")
        )

    async def read_flow_runs(self, flow_run_filter):
        tag = flow_run_filter.tags.all_[0]
        return [
            SimpleNamespace(
                id=i,
                state=SimpleNamespace(
                    type=self.runs[i], message=f"state {self.runs[i].value}", timestamp=self.stuck_since
                ),
            )
            for i in self.runs
            if tag in self.tags[i]
        ]

    async def set_flow_run_state(self, run_id, state, force):
        if state.type == StateType.CANCELLING and self.stuck_since is not None:
            self.runs[run_id] = StateType.CANCELLING  # no process to end it
        else:
            self.runs[run_id] = StateType.CANCELLED  # as the worker ends it


@pytest.fixture
def world(tmp_path: Path):
    settings = ApiSettings(data_dir=tmp_path, max_attempts=2)
    settings.files_dir.mkdir(parents=True)
    engine = db.make_engine(settings.db_url)
    asyncio.run(db.create_tables(engine))
    sessions = db.sessions(engine)
    yield settings, sessions, Supervisor(settings, sessions, Catalogued(None)), FakePrefect()
    asyncio.run(engine.dispose())


def _new_batch(settings: ApiSettings, sessions, lines: int, window_s: int = 3600) -> str:
    file_id, batch_id = db.new_id("file-"), db.new_id("batch_")
    (settings.files_dir / file_id).write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})
            + "\n"
            for i in range(lines)
        )
    )

    async def add() -> None:
        async with sessions() as s, s.begin():
            s.add(db.ApiKey(id="key_1", name="k", sha256="0" * 64, prefix="llmflow-xx"))
            s.add(db.FileRow(id=file_id, owner="key_1", filename="in.jsonl", purpose="batch", bytes=1))
            s.add(
                db.BatchRow(
                    id=batch_id,
                    owner="key_1",
                    endpoint="/v1/completions",
                    input_file_id=file_id,
                    completion_window="1h",
                    expires_at=db.now() + window_s,
                )
            )

    asyncio.run(add())
    return batch_id


def _step(world, batch_id: str) -> db.BatchRow:
    settings, sessions, supervisor, prefect = world

    async def go() -> db.BatchRow:
        await supervisor.step(batch_id, prefect)
        async with sessions() as s:
            return await s.get(db.BatchRow, batch_id)

    return asyncio.run(go())


def _answer(settings: ApiSettings, batch_id: str, ids: range, status: int = 200) -> None:
    out = shares.share_output(settings.batches_dir / batch_id, DEFAULT_SHARE)
    with out.open("a") as f:
        for i in ids:
            f.write(
                json.dumps({"id": "r", "custom_id": f"c{i}", "response": {"status_code": status, "body": {}}}) + "\n"
            )


def test_a_batch_from_validating_to_completed(world):
    settings, _, _, prefect = world
    batch_id = _new_batch(settings, world[1], 5)
    batch = _step(world, batch_id)
    assert (batch.status, batch.total, [r.model for r in batch.runs]) == ("in_progress", 5, [DEFAULT_SHARE])
    batch = _step(world, batch_id)  # starts the flow run
    (run_id,) = prefect.runs
    assert batch.id in prefect.tags[run_id] and prefect.parameters[run_id]["batch"]["rewrite_model_to_served_name"]
    _answer(settings, batch_id, range(4))
    _answer(settings, batch_id, range(4, 5), status=400)
    prefect.runs[run_id] = StateType.RUNNING
    batch = _step(world, batch_id)
    assert (batch.status, batch.completed, batch.failed) == ("in_progress", 4, 1)  # live counts
    prefect.runs[run_id] = StateType.COMPLETED
    assert _step(world, batch_id).status == "finalizing"
    batch = _step(world, batch_id)
    assert (batch.status, batch.completed, batch.failed, len(prefect.runs)) == ("completed", 4, 1, 1)
    assert len((settings.files_dir / batch.output_file_id).read_text().splitlines()) == 4
    assert json.loads((settings.files_dir / batch.error_file_id).read_text())["custom_id"] == "c4"
    assert list((settings.batches_dir / batch_id).glob("*.jsonl")) == []  # the shares' copies are gone


def test_a_failed_flow_run_is_resumed_then_given_up_with_its_reason(world):
    settings, _, _, prefect = world
    batch_id = _new_batch(settings, world[1], 3)
    _step(world, batch_id)
    _step(world, batch_id)
    _answer(settings, batch_id, range(1))
    (first,) = prefect.runs
    prefect.runs[first] = StateType.CRASHED
    batch = _step(world, batch_id)  # attempt 2 of max_attempts=2
    assert len(prefect.runs) == 2 and batch.runs[0].attempt == 2 and batch.status == "in_progress"
    second = next(r for r in prefect.runs if r != first)
    prefect.runs[second] = StateType.FAILED
    assert _step(world, batch_id).status == "finalizing"
    batch = _step(world, batch_id)
    assert (batch.status, batch.completed, batch.failed) == ("completed", 1, 2)
    errors = [json.loads(x)["error"] for x in (settings.files_dir / batch.error_file_id).read_text().splitlines()]
    assert {e["code"] for e in errors} == {"request_not_served"} and "FAILED" in errors[0]["message"]


def test_cancel_cancels_the_flow_run_then_writes_what_finished(world):
    settings, sessions, _, prefect = world
    batch_id = _new_batch(settings, sessions, 4)
    _step(world, batch_id)
    _step(world, batch_id)
    _answer(settings, batch_id, range(2))
    (run_id,) = prefect.runs
    prefect.runs[run_id] = StateType.RUNNING

    async def cancel() -> None:
        async with sessions() as s, s.begin():
            row = await s.get(db.BatchRow, batch_id)
            row.status, row.cancelling_at = "cancelling", db.now()

    asyncio.run(cancel())
    batch = _step(world, batch_id)
    assert prefect.runs[run_id] == StateType.CANCELLED and batch.status == "cancelling"
    batch = _step(world, batch_id)
    assert (batch.status, batch.completed, batch.failed) == ("cancelled", 2, 2) and batch.cancelled_at
    codes = [
        json.loads(x)["error"]["code"] for x in (settings.files_dir / batch.error_file_id).read_text().splitlines()
    ]
    assert codes == ["batch_cancelled", "batch_cancelled"]


def test_an_expired_window_cancels_and_ends_expired(world):
    settings, sessions, _, prefect = world
    batch_id = _new_batch(settings, sessions, 2, window_s=-1)
    _step(world, batch_id)  # validated even when late: then the window is checked
    batch = _step(world, batch_id)  # nothing runs: straight through finalizing
    assert batch.status == "expired" and batch.finalizing_at and batch.expired_at and not prefect.runs
    assert batch.output_file_id is None
    assert batch.failed == 2


def test_a_restart_between_creating_the_flow_run_and_saving_it_reuses_that_run(world):
    settings, sessions, supervisor, prefect = world
    batch_id = _new_batch(settings, sessions, 1)
    _step(world, batch_id)

    async def start_but_lose_it() -> None:  # the service died before its commit
        async with sessions() as s:
            row = await s.get(db.BatchRow, batch_id)
            await supervisor.start_run(row, row.runs[0], prefect)

    asyncio.run(start_but_lose_it())
    _step(world, batch_id)
    assert len(prefect.runs) == 1


def test_a_pass_that_read_the_batch_before_a_cancel_cannot_undo_it(world):
    settings, sessions, supervisor, prefect = world
    batch_id = _new_batch(settings, sessions, 2)
    _step(world, batch_id)

    async def race() -> None:
        from sqlalchemy import update

        async with sessions() as s:
            row = await s.get(db.BatchRow, batch_id)  # the supervisor's pass reads ...
            await supervisor.start_run(row, row.runs[0], prefect)  # ... starts a flow run, counts ...
            row.completed = 1
            async with sessions() as api, api.begin():  # ... the API stores a cancel ...
                await api.execute(
                    update(db.BatchRow)
                    .where(db.BatchRow.id == batch_id)
                    .values(status="cancelling", version=db.BatchRow.version + 1)
                )
            with pytest.raises(StaleDataError):  # ... and the pass's commit fails instead of undoing it
                await s.commit()

    asyncio.run(race())
    (orphan,) = prefect.runs
    batch = _step(world, batch_id)
    assert prefect.runs[orphan] == StateType.CANCELLED  # found by its tag although never saved
    batch = _step(world, batch_id)
    assert batch.status == "cancelled" and batch.failed == 2


def test_a_flow_run_stuck_in_cancelling_is_marked_cancelled_after_the_grace(world):
    settings, sessions, _, prefect = world
    batch_id = _new_batch(settings, sessions, 2)
    _step(world, batch_id)
    _step(world, batch_id)
    (run_id,) = prefect.runs
    prefect.runs[run_id] = StateType.RUNNING

    async def cancel() -> None:
        async with sessions() as s, s.begin():
            row = await s.get(db.BatchRow, batch_id)
            row.status = "cancelling"

    asyncio.run(cancel())
    prefect.stuck_since = datetime.now(UTC)
    assert _step(world, batch_id).status == "cancelling" and prefect.runs[run_id] == StateType.CANCELLING
    assert _step(world, batch_id).status == "cancelling"  # within the grace: it waits
    prefect.stuck_since = datetime.now(UTC) - timedelta(seconds=settings.cancel_grace_s + 1)
    _step(world, batch_id)
    assert prefect.runs[run_id] == StateType.CANCELLED
    assert _step(world, batch_id).status == "cancelled"

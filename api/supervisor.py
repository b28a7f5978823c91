"""Carries every active batch through OpenAI's lifecycle, from the database's state alone.

Each pass reads the active batches and moves each one step: ``validating`` checks and splits
its input (``shares.py``); ``in_progress`` starts one flow run of the batch deployment per
model share (tagged with the batch id), follows them through Prefect's API, resumes a failed
share with a new run (the batch flow sends only what is missing) and keeps ``request_counts``
live; ``cancelling`` and an expired window cancel the flow runs and wait for them to end;
``finalizing`` merges the shares' outputs into the output and error files. Every step is
idempotent and its result is committed before the next, so a service killed at any point and
started again carries on where it was (flow runs are created with idempotency keys).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Cancelling
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from api import shares
from api.db import (
    ACTIVE_STATES,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINAL_STATES,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRow,
    BatchRun,
    FileRow,
    now,
)
from api.settings import ApiSettings
from llmflow import catalog
from llmflow.catalog import REWRITE_FIELD
from llmflow.errors import UnknownModel

log = logging.getLogger("api.supervisor")

TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
RETRYABLE = {StateType.FAILED, StateType.CRASHED}
API_TAG = "llmflow-api"
DEFAULT_SHARE = "default"  # the share's name when there is no catalog: the deployment's own session


def stuck_cancelling(since: datetime | None, grace_s: float) -> bool:
    """A flow run Cancelling for longer than ``grace_s``: no process is there to end it. (A run
    cancelled just as the worker starts its process exits without taking the Cancelled state,
    and Prefect's own timeout for that is 5 minutes: the batch would wait that long.)"""
    return since is not None and (datetime.now(UTC) - since).total_seconds() > grace_s


def note_state(run: BatchRun, state: Any) -> StateType | None:
    """Keep a flow run's state (type and message) on its share's row; the state's type."""
    run.state = state.type.value if state else None
    run.message = state.message if state else None
    return state.type if state else None


def output_file_id(batch_id: str, kind: str) -> str:
    """The same id however often finalizing runs (a restart mid-way does not make a second file)."""
    return "file-" + uuid.uuid5(uuid.NAMESPACE_URL, f"{batch_id}/{kind}").hex


@dataclass
class Catalogued:
    """How the service maps a line's ``model`` to a share and a share to flow parameters."""

    catalog: Any | None  # llmflow.catalog.Catalog

    def lookup(self, name: str | None) -> str:
        """The share (catalog name) serving a line's ``model``; LookupError naming the catalog's
        models when there is none (no such name and no default)."""
        if self.catalog is None:
            return DEFAULT_SHARE
        try:
            return self.catalog.lookup(name)[0]
        except UnknownModel as exc:
            raise LookupError(str(exc)) from None

    def parameters(self, model: str, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch flow's parameters for one share; without a catalog the deployment's own
        session serves it. Every line is sent under the served model's name."""
        if self.catalog is None:
            return {"batch": {**batch, REWRITE_FIELD: True}}
        return self.catalog.lookup(model)[1].flow_parameters(batch)


def load_catalog(settings: ApiSettings) -> Catalogued:
    return Catalogued(None if settings.catalog is None else catalog.load_catalog(settings.catalog))


class Supervisor:
    """One pass per ``settings.poll_s``; one service process supervises (not several)."""

    def __init__(self, settings: ApiSettings, sessions: async_sessionmaker, catalog: Catalogued) -> None:
        self.settings = settings
        self.sessions = sessions
        self.catalog = catalog
        self._deployment_id: uuid.UUID | None = None

    async def tick(self) -> None:
        async with self.sessions() as db:
            ids = (await db.scalars(select(BatchRow.id).where(BatchRow.status.in_(ACTIVE_STATES)))).all()
        if not ids:
            return
        async with get_client() as client:
            for batch_id in ids:
                try:
                    await self.step(batch_id, client)
                except StaleDataError:
                    log.info("batch %s changed meanwhile (a cancel); its next pass takes that up", batch_id)
                except Exception:  # one batch's trouble must not stop the others; tried again next pass
                    log.exception("batch %s: step failed; trying again in %.0f s", batch_id, self.settings.poll_s)

    async def step(self, batch_id: str, client: PrefectClient) -> None:
        async with self.sessions() as db, db.begin():
            batch = await db.get(BatchRow, batch_id)
            if batch is None:
                return
            if batch.status == VALIDATING:
                await self.validate(db, batch)
            elif batch.status == IN_PROGRESS:
                await self.follow(db, batch, client)
            elif batch.status in (CANCELLING, FINALIZING):
                await self.wind_down(db, batch, client)
        if batch.status in FINAL_STATES:  # committed: the merged files are the batch's now
            await asyncio.to_thread(shares.remove_copies, self.folder(batch))

    def folder(self, batch: BatchRow) -> Path:
        return self.settings.batches_dir / batch.id

    async def validate(self, db: AsyncSession, batch: BatchRow) -> None:
        """validating -> failed (every bad line named, nothing started) or in_progress with one
        share per model (its flow run starts in the next step)."""
        source = self.settings.files_dir / batch.input_file_id
        if not source.exists():
            batch.errors = [
                {"code": "missing_file", "message": "the input file was deleted", "param": None, "line": None}
            ]
            batch.status, batch.failed_at = FAILED, now()
            return
        split = await asyncio.to_thread(
            shares.split_input,
            source,
            self.catalog.lookup,
            self.folder(batch),
            self.settings.max_requests_per_batch,
        )
        batch.total = split.total
        if split.error_count:
            batch.errors = split.openai_errors()
            batch.status, batch.failed_at = FAILED, now()
            log.info("batch %s failed validation: %d bad lines", batch.id, split.error_count)
            return
        for model, lines in split.shares.items():
            batch.runs.append(BatchRun(model=model, lines=lines))
        batch.status, batch.in_progress_at = IN_PROGRESS, now()
        log.info("batch %s: %d requests for %s", batch.id, split.total, ", ".join(split.shares))

    async def deployment_id(self, client: PrefectClient) -> uuid.UUID:
        if self._deployment_id is None:
            self._deployment_id = (await client.read_deployment_by_name(self.settings.deployment)).id
        return self._deployment_id

    async def start_run(self, batch: BatchRow, run: BatchRun, client: PrefectClient) -> None:
        """A flow run of the batch deployment for one share; a later attempt resumes its output."""
        run.attempt += 1
        folder = self.folder(batch)
        parameters = self.catalog.parameters(
            run.model,
            {
                "input_path": str(shares.share_input(folder, run.model)),
                "output_path": str(shares.share_output(folder, run.model)),
            },
        )
        flow_run = await client.create_flow_run_from_deployment(
            await self.deployment_id(client),
            parameters=parameters,
            name=f"{batch.id}-{shares.share_slug(run.model)}-{run.attempt}",
            tags=[API_TAG, batch.id, f"model:{run.model}"],
            idempotency_key=f"{batch.id}/{run.model}/{run.attempt}",
        )
        run.flow_run_id, run.state, run.message = str(flow_run.id), flow_run.state_type.value, None
        log.info("batch %s: model %s runs as flow run %s (attempt %d)", batch.id, run.model, flow_run.id, run.attempt)

    async def refresh(self, run: BatchRun, client: PrefectClient) -> StateType | None:
        if run.flow_run_id is None:
            return None
        flow_run = await client.read_flow_run(uuid.UUID(run.flow_run_id))
        return note_state(run, flow_run.state)

    async def count(self, batch: BatchRow) -> None:
        """``request_counts`` from the shares' outputs so far."""
        folder = self.folder(batch)
        counts = await asyncio.to_thread(
            lambda: [shares.count_output(shares.share_output(folder, r.model)) for r in batch.runs]
        )
        batch.completed = sum(c.completed for c in counts)
        batch.failed = sum(c.failed for c in counts)

    async def follow(self, db: AsyncSession, batch: BatchRow, client: PrefectClient) -> None:
        """Start what has no flow run, resume what failed, count, and move on when all ended."""
        if now() >= batch.expires_at:
            batch.status, batch.finalizing_at, batch.final_status = FINALIZING, now(), EXPIRED
            log.info("batch %s: the completion window passed; cancelling its flow runs", batch.id)
            await self.wind_down(db, batch, client)
            return
        done = True
        for run in batch.runs:
            state = await self.refresh(run, client)
            if state is None or (state in RETRYABLE and run.attempt < self.settings.max_attempts):
                if state is not None:
                    log.warning(
                        "batch %s: flow run %s ended %s (%s); resuming",
                        batch.id,
                        run.flow_run_id,
                        state.value,
                        run.message,
                    )
                await self.start_run(batch, run, client)
                done = False
            elif state not in TERMINAL:
                done = False
        await self.count(batch)
        if done:
            batch.status, batch.finalizing_at, batch.final_status = FINALIZING, now(), COMPLETED

    async def wind_down(self, db: AsyncSession, batch: BatchRow, client: PrefectClient) -> None:
        """Cancel what still runs (a cancel or an expired window); once every flow run ended,
        write the output and error files and take the final state. The flow runs are found by
        the batch's tag, so one created by a pass whose commit lost to a cancel is cancelled too."""
        final = batch.final_status or (CANCELLED if batch.status == CANCELLING else COMPLETED)
        tagged = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[batch.id])))
        states = {str(fr.id): fr.state for fr in tagged}
        for run in batch.runs:  # the same read gives each share's last state, for the error records
            if run.flow_run_id in states:
                note_state(run, states[run.flow_run_id])
        running = [fr for fr in tagged if fr.state is None or fr.state.type not in TERMINAL]
        if final in (CANCELLED, EXPIRED):
            for fr in running:
                if fr.state is None or fr.state.type != StateType.CANCELLING:
                    await client.set_flow_run_state(fr.id, Cancelling(message=f"batch {batch.id} {final}"), force=True)
                elif stuck_cancelling(fr.state.timestamp, self.settings.cancel_grace_s):
                    await client.set_flow_run_state(
                        fr.id,
                        Cancelled(message=f"no flow process ended it within {self.settings.cancel_grace_s:.0f} s"),
                        force=True,
                    )
                    log.warning("batch %s: flow run %s stayed Cancelling; marked Cancelled", batch.id, fr.id)
        await self.count(batch)
        if running:
            return
        await self.finalize(db, batch, final)

    async def finalize(self, db: AsyncSession, batch: BatchRow, final: str) -> None:
        folder = self.folder(batch)
        files = self.settings.files_dir
        out_id, err_id = output_file_id(batch.id, "output"), output_file_id(batch.id, "errors")
        reasons = {
            shares.share_input(folder, r.model): f"flow run {r.flow_run_id} ended {r.state}: {r.message}"
            for r in batch.runs
        }
        pairs = [(shares.share_input(folder, r.model), shares.share_output(folder, r.model)) for r in batch.runs]
        tmp_out, tmp_err = files / f"{out_id}.tmp", files / f"{err_id}.tmp"
        counts = await asyncio.to_thread(shares.merge_outputs, pairs, tmp_out, tmp_err, final, reasons)
        for tmp, file_id, kind in ((tmp_out, out_id, "output"), (tmp_err, err_id, "error")):
            if not tmp.exists():
                continue
            tmp.chmod(0o600)
            tmp.replace(files / file_id)
            if await db.get(FileRow, file_id) is None:
                db.add(
                    FileRow(
                        id=file_id,
                        owner=batch.owner,
                        filename=f"{batch.id}_{kind}.jsonl",
                        purpose="batch_output",
                        bytes=(files / file_id).stat().st_size,
                    )
                )
            if kind == "output":
                batch.output_file_id = file_id
            else:
                batch.error_file_id = file_id
        batch.completed, batch.failed = counts.completed, counts.failed
        batch.status = final
        setattr(batch, f"{final}_at", now())
        log.info("batch %s %s: %d completed, %d failed", batch.id, final, counts.completed, counts.failed)


async def supervise(settings: ApiSettings, sessions: async_sessionmaker, stop: asyncio.Event) -> None:
    """Pass over the active batches every ``settings.poll_s`` until ``stop`` is set."""
    supervisor = Supervisor(settings, sessions, load_catalog(settings))
    while not stop.is_set():
        try:
            await supervisor.tick()
        except Exception:  # the database or Prefect is away for a moment: the next pass retries
            log.exception("supervisor pass failed; next in %.0f s", settings.poll_s)
        try:
            await asyncio.wait_for(stop.wait(), settings.poll_s)
        except TimeoutError:
            pass

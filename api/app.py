"""The HTTP side of ``llmflow api``: OpenAI's Files and Batches endpoints over the service's
database and files folder, so that ``openai.OpenAI(base_url=...)`` works unchanged.

Handlers only read and write rows and file contents; the supervisor (started by the app's
lifespan) carries each batch from ``validating`` to a final state. Every answer that is not a
success has OpenAI's error shape, request validation included (400, never FastAPI's 422).
A key sees only its own files and batches: another key's id is answered exactly as an id
that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import noload
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api import files
from api.db import (
    CANCELLING,
    IN_PROGRESS,
    VALIDATING,
    BatchRow,
    FileRow,
    create_tables,
    make_engine,
    new_id,
    now,
    sessions,
)
from api.keys import masked, owner_of
from api.schemas import (
    Batch,
    CreateBatch,
    ErrorBody,
    ErrorDetail,
    File,
    FileDeleted,
    Model,
    ModelList,
    Page,
    batch_object,
    file_object,
)
from api.settings import ApiSettings, window_seconds

log = logging.getLogger("api")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
UPLOAD_PURPOSES = ("batch",)
CANCELLABLE = (VALIDATING, IN_PROGRESS)
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits
STALE_UPLOAD_S = 3600  # a .part file untouched this long belongs to a process that died mid-upload

T = TypeVar("T")
R = TypeVar("R")


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error_response(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


# ---- checks: pure, each returns the problem or None --------------------------------------


def endpoint_problem(endpoint: str) -> str | None:
    if endpoint in ENDPOINTS:
        return None
    return f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: {', '.join(ENDPOINTS)}."


def window_problem(window: str, settings: ApiSettings) -> str | None:
    """``window`` must be ``<n>s|m|h|d`` within the settings' bounds (both included)."""
    lo, hi = settings.min_completion_window, settings.max_completion_window
    allowed = f"from {lo} to {hi}" if lo != hi else f"{lo}"
    try:
        seconds = window_seconds(window)
    except ValueError:
        return f"Invalid value for 'completion_window': {window!r}. Use a number and a unit (s, m, h, d), {allowed}."
    if not window_seconds(lo) <= seconds <= window_seconds(hi):
        return f"Invalid value for 'completion_window': {window!r}. Supported windows are {allowed}."
    return None


def metadata_problem(metadata: dict[str, str] | None) -> str | None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
    if not metadata:
        return None
    if len(metadata) > METADATA_PAIRS:
        return f"Invalid 'metadata': at most {METADATA_PAIRS} key-value pairs, got {len(metadata)}."
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            return f"Invalid 'metadata': key {key[:20]!r}... is longer than {METADATA_KEY_CHARS} characters."
        if len(value) > METADATA_VALUE_CHARS:
            return f"Invalid 'metadata': the value of {key!r} is longer than {METADATA_VALUE_CHARS} characters."
    return None


# ---- dependencies --------------------------------------------------------------------------


async def db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


async def caller(request: Request, session: Annotated[AsyncSession, Depends(db)]) -> str:
    """The id of the key the request is from; 401 (OpenAI's ``invalid_api_key``) otherwise.
    The key is looked up on every request, so a revoked key stops working at once."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="invalid_api_key",
        )
    owner = await owner_of(session, secret)
    await session.rollback()  # hold no connection while the handler works (an upload takes long)
    if owner is None:
        raise ApiError(401, f"Incorrect API key provided: {masked(secret)}.", code="invalid_api_key")
    return owner


Owner = Annotated[str, Depends(caller)]
Db = Annotated[AsyncSession, Depends(db)]


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


# ---- lookups and pages ---------------------------------------------------------------------


async def _file(session: AsyncSession, owner: str, file_id: str) -> FileRow:
    row = await session.scalar(
        select(FileRow).where(FileRow.id == file_id, FileRow.owner == owner, FileRow.deleted_at.is_(None))
    )
    if row is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id")
    return row


async def _batch(session: AsyncSession, owner: str, batch_id: str, *, fresh: bool = False) -> BatchRow:
    query = select(BatchRow).options(noload(BatchRow.runs)).where(BatchRow.id == batch_id, BatchRow.owner == owner)
    if fresh:
        query = query.execution_options(populate_existing=True)
    row = await session.scalar(query)
    if row is None:
        raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")
    return row


def _after(model: Any, cursor_at: int, cursor_id: str, descending: bool):
    """Rows after the cursor row in (created_at, id) order: ids break ties within a second."""
    if descending:
        return or_(model.created_at < cursor_at, and_(model.created_at == cursor_at, model.id < cursor_id))
    return or_(model.created_at > cursor_at, and_(model.created_at == cursor_at, model.id > cursor_id))


async def _cursor(session: AsyncSession, model: Any, owner: str, after: str) -> int:
    """The cursor row's created_at; a deleted file still works as a cursor (a client deleting
    while it pages must not lose its place)."""
    created = await session.scalar(select(model.created_at).where(model.id == after, model.owner == owner))
    if created is None:
        raise ApiError(400, f"Invalid value for 'after': no such object {after!r}.", param="after")
    return created


def _page(rows: Sequence[R], limit: int, convert: Callable[[R], T]) -> Page[T]:
    data = [convert(r) for r in rows[:limit]]
    return Page(
        data=data,
        first_id=data[0].id if data else None,  # type: ignore[attr-defined]
        last_id=data[-1].id if data else None,  # type: ignore[attr-defined]
        has_more=len(rows) > limit,
    )


# ---- the app -------------------------------------------------------------------------------


def _remove_stale_uploads(settings: ApiSettings) -> None:
    cutoff = time.time() - STALE_UPLOAD_S
    for part in settings.files_dir.glob(".file-*.part"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
        except FileNotFoundError:
            pass


def _log_supervisor_end(task: asyncio.Task) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the batch supervisor stopped: no batch will progress until a restart", exc_info=exc)


def _catalog_models(settings: ApiSettings) -> ModelList:
    """What ``/v1/models`` lists: the catalog's names (the file's time as ``created``); none
    without a catalog (every line is then served by the deployment's own session)."""
    if settings.catalog is None:
        return ModelList(data=[])
    from llmflow.catalog import load_catalog

    created = int(settings.catalog.stat().st_mtime)
    return ModelList(data=[Model(id=name, created=created) for name in load_catalog(settings.catalog).names])


def create_app(settings: ApiSettings, *, supervise: bool = True) -> FastAPI:
    """The API service.

    Args:
        settings: where state lives and what is accepted.
        supervise: start the batch supervisor with the app (off for tests and benchmarks of the
            HTTP layer alone: batches then stay as they are created).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        files.make_dirs(settings)
        _remove_stale_uploads(settings)
        engine = make_engine(settings.db_url)
        await create_tables(engine)
        app.state.settings = settings
        app.state.sessions = sessions(engine)
        app.state.models = _catalog_models(settings)
        stop = asyncio.Event()
        task: asyncio.Task | None = None
        if supervise:
            from api.supervisor import supervise as run_supervisor  # may import Prefect

            task = asyncio.create_task(run_supervisor(settings, app.state.sessions, stop), name="batch-supervisor")
            task.add_done_callback(_log_supervisor_end)
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            await engine.dispose()

    app = FastAPI(title="llmflow API", summary="OpenAI-compatible Files and Batches", lifespan=lifespan)
    app.state.settings = settings
    _add_error_handlers(app)
    _add_file_routes(app)
    _add_batch_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ())]
        param = loc[1] if len(loc) > 1 and first.get("type") != "json_invalid" else None
        kind = first.get("type", "")
        if kind == "json_invalid" or (kind == "model_attributes_type" and param is None):
            message = "We could not parse the JSON body of your request: expected a JSON object."
        elif kind == "missing":
            message = f"Missing required parameter: '{param}'."
        elif kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"Invalid value for '{'.'.join(loc[1:]) or param}': {first.get('msg', 'invalid')}."
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else exc.detail
        return _error_response(exc.status_code, str(message), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer: the server logs its traceback
        return _error_response(500, "The server had an error while processing your request.", "server_error")


UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    },
                }
            }
        },
    }
}


def _add_file_routes(app: FastAPI) -> None:
    @app.post("/v1/files", response_model=File, openapi_extra=UPLOAD_FORM)
    async def upload_file(request: Request, owner: Owner) -> File:
        """Streamed to disk as it arrives (see ``files.receive``), never held in memory."""
        settings = _settings(request)
        file_id = new_id("file-")
        try:
            upload = await files.receive(settings, file_id, request.headers.get("content-type"), request.stream())
        except files.UploadError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except ClientDisconnect:
            raise ApiError(400, "The client disconnected during the upload.", param="file") from None
        try:
            purpose = upload.fields.get("purpose")
            if purpose is None:
                raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
            if purpose not in UPLOAD_PURPOSES:
                raise ApiError(
                    400, f"Invalid value for 'purpose': {purpose!r}. This service accepts 'batch'.", param="purpose"
                )
            upload.commit(settings)
            row = FileRow(
                id=file_id,
                owner=owner,
                filename=upload.filename or "upload",
                purpose=purpose,
                bytes=upload.bytes,
                created_at=now(),
            )
            async with request.app.state.sessions() as session:
                session.add(row)
                await session.commit()
        except BaseException:
            upload.discard()
            files.remove(settings, file_id)
            raise
        return file_object(row)

    @app.get("/v1/files", response_model=Page[File])
    async def list_files(
        owner: Owner,
        session: Db,
        purpose: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> Page[File]:
        descending = order == "desc"
        query = select(FileRow).where(FileRow.owner == owner, FileRow.deleted_at.is_(None))
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        if after is not None:
            query = query.where(_after(FileRow, await _cursor(session, FileRow, owner, after), after, descending))
        keys = (FileRow.created_at.desc(), FileRow.id.desc()) if descending else (FileRow.created_at, FileRow.id)
        rows = (await session.scalars(query.order_by(*keys).limit(limit + 1))).all()
        return _page(rows, limit, file_object)

    @app.get("/v1/files/{file_id}", response_model=File)
    async def retrieve_file(file_id: str, owner: Owner, session: Db) -> File:
        return file_object(await _file(session, owner, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str, owner: Owner, session: Db) -> FileResponse:
        """Streamed from disk in blocks."""
        row = await _file(session, owner, file_id)
        path = files.file_path(_settings(request), row.id)
        if not path.is_file():
            raise ApiError(404, f"No content for File object: {file_id}", param="id")
        return FileResponse(path, media_type="application/octet-stream", filename=row.filename)

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted)
    async def delete_file(request: Request, file_id: str, owner: Owner, session: Db) -> FileDeleted:
        row = await _file(session, owner, file_id)
        row.deleted_at = now()
        await session.commit()
        files.remove(_settings(request), file_id)
        return FileDeleted(id=file_id)


def _add_batch_routes(app: FastAPI) -> None:
    @app.post("/v1/batches", response_model=Batch)
    async def create_batch(request: Request, body: CreateBatch, owner: Owner, session: Db) -> Batch:
        settings = _settings(request)
        if problem := endpoint_problem(body.endpoint):
            raise ApiError(400, problem, param="endpoint")
        if problem := window_problem(body.completion_window, settings):
            raise ApiError(400, problem, param="completion_window")
        if problem := metadata_problem(body.metadata):
            raise ApiError(400, problem, param="metadata")
        source = await session.scalar(
            select(FileRow).where(
                FileRow.id == body.input_file_id, FileRow.owner == owner, FileRow.deleted_at.is_(None)
            )
        )
        if source is None:
            raise ApiError(
                400, f"Invalid 'input_file_id': no such File object: {body.input_file_id}", param="input_file_id"
            )
        if source.purpose != "batch":
            raise ApiError(
                400,
                f"Invalid 'input_file_id': {source.id} has purpose {source.purpose!r}; a batch's input needs 'batch'.",
                param="input_file_id",
            )
        created = now()
        row = BatchRow(
            id=new_id("batch_"),
            owner=owner,
            endpoint=body.endpoint,
            input_file_id=source.id,
            completion_window=body.completion_window,
            status=VALIDATING,
            metadata_=body.metadata,
            errors=None,
            total=0,
            completed=0,
            failed=0,
            created_at=created,
            expires_at=created + window_seconds(body.completion_window),
        )
        session.add(row)
        await session.commit()
        return batch_object(row)

    @app.get("/v1/batches", response_model=Page[Batch])
    async def list_batches(
        owner: Owner,
        session: Db,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: str | None = None,
    ) -> Page[Batch]:
        """Newest first."""
        query = select(BatchRow).options(noload(BatchRow.runs)).where(BatchRow.owner == owner)
        if after is not None:
            query = query.where(_after(BatchRow, await _cursor(session, BatchRow, owner, after), after, True))
        query = query.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit + 1)
        return _page((await session.scalars(query)).all(), limit, batch_object)

    @app.get("/v1/batches/{batch_id}", response_model=Batch)
    async def retrieve_batch(batch_id: str, owner: Owner, session: Db) -> Batch:
        return batch_object(await _batch(session, owner, batch_id))

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(owner: Owner, request: Request) -> ModelList:
        """The names a batch line's ``model`` may take."""
        return request.app.state.models

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
    async def cancel_batch(batch_id: str, owner: Owner, session: Db) -> Batch:
        """validating or in_progress -> cancelling (the supervisor stops the runs and writes the
        partial output); cancelling again answers the batch as it is; any other status is 409,
        as OpenAI answers. One conditional UPDATE, so a supervisor's move in between is not lost."""
        row = await _batch(session, owner, batch_id)
        if row.status in CANCELLABLE:
            await session.execute(
                update(BatchRow)
                .where(BatchRow.id == row.id, BatchRow.status.in_(CANCELLABLE))
                .values(status=CANCELLING, cancelling_at=now(), version=BatchRow.version + 1)
                .execution_options(synchronize_session=False)
            )
            await session.commit()
            row = await _batch(session, owner, batch_id, fresh=True)
        if row.status != CANCELLING:
            raise ApiError(409, f"Cannot cancel a batch with status '{row.status}'.")
        return batch_object(row)

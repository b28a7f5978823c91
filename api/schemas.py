"""What the API answers and accepts, in OpenAI's exact shapes, so that the official SDKs (and
anything written against api.openai.com) work unchanged. Rows become objects here only."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from api.db import BatchRow, FileRow

T = TypeVar("T")


class File(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class BatchError(BaseModel):
    """One problem of a batch as a whole (an invalid input file), with the line when it is one line's."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class Page(BaseModel, Generic[T]):
    """A page of a cursor-paginated list: the next page starts ``after`` ``last_id``."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class Model(BaseModel):
    """A model a batch line may name: a catalog entry (``client.models.list()``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmflow"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error answer: the SDKs read ``error.message``, ``param`` and ``code`` from it."""

    error: ErrorDetail


class CreateBatch(BaseModel):
    """The body of POST /v1/batches. Its values are checked against the settings by the route;
    here only their types. An unknown field is refused, as OpenAI refuses one."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None)


def file_object(row: FileRow) -> File:
    return File(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename, purpose=row.purpose)


def _errors(errors: list[Any] | None) -> BatchErrors | None:
    if not errors:
        return None
    return BatchErrors(
        data=[BatchError.model_validate(e) if isinstance(e, dict) else BatchError(message=str(e)) for e in errors]
    )


def batch_object(row: BatchRow) -> Batch:
    return Batch(
        id=row.id,
        endpoint=row.endpoint,
        errors=_errors(row.errors),
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        in_progress_at=row.in_progress_at,
        expires_at=row.expires_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        request_counts=RequestCounts(total=row.total or 0, completed=row.completed or 0, failed=row.failed or 0),
        metadata=row.metadata_,
    )

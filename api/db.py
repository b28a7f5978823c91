"""The API service's state: keys, files and batches in one SQL database (SQLAlchemy, async).

SQLite (``sqlite+aiosqlite:///...``) by default, PostgreSQL by a URL
(``postgresql+asyncpg://...``); both drivers come with Prefect. Everything a batch's lifecycle
needs lives here, never only in the API process's memory, so a restarted service picks every
batch up where it was. File contents live on disk (``files.py``); rows only name them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# OpenAI's batch states; the first five are not final (the supervisor still has work on them)
VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING = "validating", "in_progress", "finalizing", "cancelling"
COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
ACTIVE_STATES = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
FINAL_STATES = (COMPLETED, FAILED, EXPIRED, CANCELLED)


def new_id(prefix: str) -> str:
    """``file-<hex>``, ``batch_<hex>``, ``key_<hex>``: OpenAI's id shapes, random."""
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, as every OpenAI timestamp field is."""
    return int(datetime.now(UTC).timestamp())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    """A caller. Only the key's SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # key_<hex>, names it in the CLI
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(24))  # the key's first characters, to tell keys apart
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class FileRow(Base):
    """An uploaded input file or a batch's output/error file (OpenAI's File object)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-<hex>
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))  # batch, batch_output
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, default=None)

    __table_args__ = (Index("ix_files_owner_created", "owner", "created_at"),)


class BatchRow(Base):
    """OpenAI's Batch object, plus what the supervisor needs to carry it through."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # batch_<hex>
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=VALIDATING, index=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, default=None)
    errors: Mapped[list[Any] | None] = mapped_column(JSON, default=None)  # [{code, message, param, line}]
    output_file_id: Mapped[str | None] = mapped_column(String(64), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(64), default=None)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # where finalizing leads (completed, expired or cancelled), kept so a restart mid-way finishes it
    final_status: Mapped[str | None] = mapped_column(String(16), default=None)

    # bumped by every write, so a write based on a stale read fails instead of undoing another
    # (the supervisor's pass must not overwrite a cancel the API stored meanwhile)
    version: Mapped[int] = mapped_column(Integer, default=1)

    runs: Mapped[list[BatchRun]] = relationship(
        back_populates="batch", order_by="BatchRun.model", lazy="selectin", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_batches_owner_created", "owner", "created_at"),)
    __mapper_args__ = {"version_id_col": version}


class BatchRun(Base):
    """One model's share of a batch: its input lines, the flow run serving them, its output."""

    __tablename__ = "batch_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))  # the catalog name
    lines: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # flow runs started for it so far
    flow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[str | None] = mapped_column(String(32), default=None)  # the flow run's state type
    message: Mapped[str | None] = mapped_column(Text, default=None)  # the flow run's state message

    batch: Mapped[BatchRow] = relationship(back_populates="runs")


def make_engine(url: str) -> AsyncEngine:
    """An engine for ``url``; SQLite gets WAL (readers never wait for the supervisor's writes)
    and a busy timeout, so the API's handlers and the supervisor can share one file."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True)


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def sessions(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)

"""The API service's settings: environment variables ``LLMFLOW_API_*`` or ``llmflow api serve`` flags."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

WINDOW = re.compile(r"^([1-9][0-9]*)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """``"24h"`` -> 86400. Raises ValueError for anything else than ``<n>s|m|h|d``."""
    m = WINDOW.match(window)
    if not m:
        raise ValueError(f"completion_window {window!r}: expected a number and a unit, such as 24h")
    return int(m.group(1)) * UNIT_S[m.group(2)]


class ApiSettings(BaseSettings):
    """Where the service keeps its state, what it accepts, and which deployment runs a batch."""

    model_config = SettingsConfigDict(env_prefix="LLMFLOW_API_", extra="forbid")

    data_dir: Path = Field(
        default=Path("~/.llmflow/api"),
        description="Files (inputs, outputs) and, by default, the SQLite database live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db; default SQLite in data_dir.",
    )
    catalog: Path | None = Field(
        default=None, description="The model catalog file: which served model each request's model name means."
    )
    deployment: str = Field(
        default="batch-inference/batch", description="The Prefect deployment each batch runs as (flow/deployment)."
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8080, ge=1, le=65535, description="Port to listen on.")
    max_file_bytes: int = Field(default=200 * 1024**2, ge=1, description="Largest upload (OpenAI: 200 MB).")
    max_requests_per_batch: int = Field(default=50_000, ge=1, description="Most lines in one batch (OpenAI: 50,000).")
    min_completion_window: str = Field(default="24h", description="Shortest completion_window accepted.")
    max_completion_window: str = Field(default="7d", description="Longest completion_window accepted.")
    max_attempts: int = Field(
        default=3, ge=1, description="Flow runs per model share of a batch; a failed run is resumed by the next."
    )
    cancel_grace_s: float = Field(
        default=60.0,
        gt=0,
        description="A flow run still Cancelling this long after a cancel or expiry is marked Cancelled.",
    )
    poll_s: float = Field(default=2.0, gt=0, description="Seconds between the supervisor's passes over active batches.")

    @field_validator("min_completion_window", "max_completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        window_seconds(value)
        return value

    @field_validator("data_dir", "catalog")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'api.db'}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def batches_dir(self) -> Path:
        """Each batch's per-model inputs and the flow runs' outputs, before finalizing."""
        return self.data_dir / "batches"

"""What a stress-test campaign measures: a grid of context sizes x concurrency x output length.

The same pydantic model is the flow's parameter (a form in the Prefect UI) and the schema of
the campaign files under ``benchmarks/campaigns/`` (TOML or YAML), so a file and a form are
checked by the same rules and an error names the field (``campaign.context_sizes.2`` ...).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from llmflow import paths
from llmflow.bench.metrics import Outcome
from llmflow.config import PROJECT_ROOT
from llmflow.config_files import read_table
from llmflow.errors import CampaignFileError
from llmflow.results import CellResult
from llmflow.validation import config_problems

DEFAULT_OUTPUT_ROOT = PROJECT_ROOT / "out" / "campaigns"


class CampaignConfig(BaseModel):
    """One campaign: which cells to run and how hard to push each."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="campaign", pattern=r"^[A-Za-z0-9_.-]+$", description="Names the output folder and artifacts."
    )
    context_sizes: list[int] = Field(
        default=[32, 64, 128, 240], min_length=1, description="Prompt lengths in tokens, one cell row each."
    )
    concurrencies: list[int] = Field(default=[1, 4], min_length=1, description="Requests in flight at once.")
    output_tokens: list[int] = Field(
        default=[8], min_length=1, description="Completion length each request is forced to."
    )
    rounds: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Requests per cell = concurrency x rounds, so every level is loaded as long.",
    )
    repeats: int = Field(default=1, ge=1, le=100, description="Times each cell is run; the summary pools all repeats.")
    warmup_requests: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Requests sent at the cell's shape before timing starts; recorded, not counted.",
    )
    request_timeout_s: PositiveFloat = Field(
        default=300.0, description="A request with no byte for this long counts as timed_out."
    )
    skip_larger_on: list[Outcome] = Field(
        default=["rejected"],
        description=(
            "Once a cell ends with one of these, larger contexts at the same concurrency and output length "
            "are certain to fail and are recorded as skipped instead of run."
        ),
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        description="Times the campaign starts a new server after one crashed; then the rest is not run.",
    )
    output_dir: Path | None = Field(
        default=None, description="Where the tables, JSON and plot go; default out/campaigns/<name>-<UTC time>."
    )
    resume: bool = Field(
        default=False,
        description="Keep the cells a stopped run already finished in output_dir (cells.jsonl) and run only the rest.",
    )
    baseline: Path | None = Field(
        default=None, description="A previous campaign's summary.json to compare against; regressions are flagged."
    )
    compare_to_last: bool = Field(
        default=True,
        description="Without a baseline, compare against the newest earlier campaign of this name in the default output folder.",
    )
    regression_threshold: float = Field(
        default=0.10, gt=0, lt=10, description="Relative change counted as a regression (0.10: 10% worse)."
    )
    publish_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="URL under which output_dir is served (web server, bucket); with it the plot becomes an image artifact.",
    )

    @field_validator("context_sizes", "concurrencies", "output_tokens")
    @classmethod
    def _positive_distinct(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("every value must be at least 1")
        if len(set(values)) != len(values):
            raise ValueError("values must be distinct")
        return sorted(values)

    def resolved_output_dir(self, stamp: str) -> Path:
        return self.output_dir or DEFAULT_OUTPUT_ROOT / f"{self.name}-{stamp}"

    def resolved_baseline(self, output_dir: Path) -> Path | None:
        """``baseline``, else (with ``compare_to_last``) the newest earlier summary of this
        campaign name beside ``output_dir`` (folder names sort by their UTC time)."""
        if self.baseline is not None or not self.compare_to_last:
            return self.baseline
        earlier = sorted(
            p
            for p in output_dir.parent.glob(f"{self.name}-*/summary.json")
            if p.parent != output_dir and p.parent.name[len(self.name) + 1 :][:1].isdigit()
        )
        return earlier[-1] if earlier else None


class Cell(BaseModel):
    """One point of the grid, run ``repeats`` times."""

    context: int
    concurrency: int
    output_tokens: int

    @property
    def key(self) -> str:
        return f"ctx{self.context}-c{self.concurrency}-out{self.output_tokens}"


def cell_result(cell: Cell, status: str, **fields: Any) -> CellResult:
    """The result record of ``cell``: its identity, its verdict and whatever else is known."""
    return CellResult(key=cell.key, **cell.model_dump(), status=status, **fields)


def grid(campaign: CampaignConfig) -> list[Cell]:
    """Cells in run order: for each output length and concurrency, contexts smallest first, so a
    context that fails can spare the larger ones."""
    return [
        Cell(context=ctx, concurrency=conc, output_tokens=out)
        for out, conc, ctx in itertools.product(campaign.output_tokens, campaign.concurrencies, campaign.context_sizes)
    ]


def skip_reason(cell: Cell, finished: Iterable[Any], skip_on: list[str]) -> str | None:
    """Why ``cell`` need not run: a smaller context at the same concurrency and output length
    ended with one of ``skip_on``. ``finished``: results with context, concurrency,
    output_tokens and status (``CellResult``)."""
    for done in finished:
        if (
            done.status in skip_on
            and done.concurrency == cell.concurrency
            and done.output_tokens == cell.output_tokens
            and done.context < cell.context
        ):
            return f"context {done.context} was {done.status}"
    return None


def campaign_path(value: str | Path) -> Path:
    """A campaign file named relative to the project root (as deployments do) or absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_campaign(path: Path) -> tuple[CampaignConfig, dict[str, Any] | None]:
    """A campaign from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file: the campaign's
    settings at the top, and optionally a ``session`` table (engine, model, placement) so the
    file alone says what is measured. Relative paths (output_dir, baseline, and the session's
    paths on this machine) are taken from the file's own folder (``llmflow.paths``), so a file
    means the same thing whatever folder the command runs in.
    """
    data = read_table(path, "campaign file", CampaignFileError)
    session = data.pop("session", None)
    if session is not None and not isinstance(session, dict):
        raise CampaignFileError(f"campaign file {path}: session: expected a table")
    base = path.resolve().parent
    for key in ("output_dir", "baseline"):
        data[key] = paths.absolute(data.get(key), base)
    if session:
        session = paths.resolve_session(session, base)
    try:
        return CampaignConfig.model_validate({k: v for k, v in data.items() if v is not None}), session
    except ValidationError as exc:
        raise CampaignFileError(f"campaign file {path}: {'; '.join(config_problems(exc, CampaignConfig))}") from None

"""What a stress-test campaign measures: a grid of context sizes x concurrency x output length.

The same pydantic model is the flow's parameter (a form in the Prefect UI) and the schema of
the campaign files under ``benchmarks/campaigns/`` (TOML or YAML), so a file and a form are
checked by the same rules and an error names the field (``campaign.context_sizes.2`` ...).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from llmflow import paths
from llmflow.bench.capacity import CapacitySearch
from llmflow.bench.metrics import SLO, Outcome, Saturation
from llmflow.config import PROJECT_ROOT
from llmflow.config_files import read_table
from llmflow.errors import CampaignFileError, ConfigError
from llmflow.results import CellResult
from llmflow.router import is_router
from llmflow.validation import config_problems

DEFAULT_OUTPUT_ROOT = PROJECT_ROOT / "out" / "campaigns"


class CampaignConfig(BaseModel):
    """One campaign: which cells to run and how hard to push each."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="campaign", pattern=r"^[A-Za-z0-9_.-]+$", description="Names the output folder and artifacts."
    )
    models: list[str] | None = Field(
        default=None,
        description=(
            "A llama-server router tier's models to measure (engine.router): every cell is run for each, in "
            "turn, and the report has a survival table, tok/s and the swap cost per model. None: the served model."
        ),
    )
    context_sizes: list[int] = Field(
        default=[32, 64, 128, 240], min_length=1, description="Prompt lengths in tokens, one cell row each."
    )
    concurrencies: list[int] = Field(
        default=[1, 4],
        min_length=1,
        description="Requests in flight at once; with rates, the cap on requests in flight of each open-loop cell.",
    )
    rates: list[float] | None = Field(
        default=None,
        description=(
            "Requests per second: when set, cells are open loop, one per rate x concurrency (as the in-flight "
            "cap) x context x output length; each request is sent at its scheduled time, latency counts from it."
        ),
    )
    open_loop_s: PositiveFloat = Field(
        default=10.0, description="Open-loop schedule length: requests per cell = max(1, round(rate x open_loop_s))."
    )
    arrival: Literal["poisson", "constant"] = Field(
        default="poisson",
        description="Open-loop gaps: poisson = gamma with shape burstiness and mean 1/rate (vLLM's); constant = 1/rate.",
    )
    burstiness: PositiveFloat = Field(
        default=1.0, description="Gamma shape of the gaps: 1 is a Poisson process, below 1 burstier, above 1 more even."
    )
    seed: int = Field(default=0, description="Seeds the arrival schedules (with the repeat), so runs are reproducible.")
    saturation: Saturation = Field(
        default_factory=Saturation,
        description="When an open-loop cell stops early as saturated: the backlog grew every window (windows 0: never).",
    )
    slo: SLO | None = Field(
        default=None,
        description="Latency limits (ttft_ms, tpot_ms, e2el_ms; percentile, default 99) for goodput and slo_met.",
    )
    output_tokens: list[int] = Field(
        default=[8], min_length=1, description="Completion length each request is forced to."
    )
    rounds: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Closed-loop requests per cell = concurrency x rounds, so every level is loaded as long.",
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
    skip_higher_rates: bool = Field(
        default=True,
        description=(
            "Once an open-loop cell is saturated, higher rates at the same context, cap and output length "
            "are recorded as skipped instead of run (they can only queue more)."
        ),
    )
    capacity: CapacitySearch | None = Field(
        default=None,
        description=(
            "Search each context size (and output length) for the highest load that holds instead of running "
            "the grid: the load (concurrency, or rate) goes start, start x factor ... up to max until a cell "
            "fails, then bisect_steps cells between the last load that held and the first that failed."
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
        default=0.10,
        gt=0,
        lt=10,
        description="Minimum effect: a figure must be worse by at least this much (0.10: 10%) to be a regression.",
    )
    regression_confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description=(
            "Confidence that a flagged figure really changed: its interval (bootstrap of the cells' requests, "
            "simultaneous over all compared figures) must lie wholly on the worse side (llmflow/bench/compare.py)."
        ),
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

    @field_validator("rates")
    @classmethod
    def _rates(cls, values: list[float] | None) -> list[float] | None:
        if values is None:
            return None
        if not values or any(not v > 0 for v in values):
            raise ValueError("give at least one rate, each above 0 (requests per second)")
        if len(set(values)) != len(values):
            raise ValueError("values must be distinct")
        return sorted(float(v) for v in values)

    @field_validator("models")
    @classmethod
    def _models(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        if not values or any(not v.strip() for v in values):
            raise ValueError("give at least one model name, none empty (or leave models out)")
        if len(set(values)) != len(values):
            raise ValueError("model names must be distinct")
        return values

    @model_validator(mode="after")
    def _models_without_capacity(self) -> CampaignConfig:
        if self.models is not None and self.capacity is not None:
            raise ValueError("models: a capacity search measures one model; drop capacity or models")
        return self

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
    concurrency: int = Field(description="Requests in flight (closed loop), or the cap on them (open loop).")
    output_tokens: int
    rate: float | None = Field(default=None, description="Requests per second of an open-loop cell; None: closed loop.")
    model: str | None = Field(
        default=None, description="The router model its requests name (campaign.models); None: the served one."
    )

    @property
    def key(self) -> str:
        """``ctx128-c4-out8`` closed loop; ``ctx128-r4.0-c64-out8`` open loop at 4 req/s, 64 in flight at most;
        ``malpha-ctx128-c4-out8`` for model alpha of a campaign that lists models."""
        model = "" if self.model is None else f"m{self.model}-"
        if self.rate is None:
            return f"{model}ctx{self.context}-c{self.concurrency}-out{self.output_tokens}"
        return f"{model}ctx{self.context}-r{self.rate:g}-c{self.concurrency}-out{self.output_tokens}"


def cell_result(cell: Cell, status: str, **fields: Any) -> CellResult:
    """The result record of ``cell``: its identity, its verdict and whatever else is known."""
    return CellResult(key=cell.key, **cell.model_dump(), status=status, **fields)


def grid(campaign: CampaignConfig) -> list[Cell]:
    """Cells in run order: for each output length and concurrency (and rate, lowest first, when
    the campaign has rates), contexts smallest first, so a context that fails can spare the
    larger ones; with ``models``, each cell for every model in turn (so the models are measured
    side by side, and a router holding fewer than all of them swaps before each cell)."""
    return [
        Cell(context=ctx, concurrency=conc, output_tokens=out, rate=rate, model=model)
        for out, conc, rate, ctx, model in itertools.product(
            campaign.output_tokens,
            campaign.concurrencies,
            campaign.rates or [None],
            campaign.context_sizes,
            campaign.models or [None],
        )
    ]


def skip_reason(cell: Cell, finished: Iterable[Any], skip_on: list[str], skip_higher_rates: bool = True) -> str | None:
    """Why ``cell`` need not run: a smaller context at the same concurrency and output length
    (and model) ended with one of ``skip_on``; or, with ``skip_higher_rates``, a lower rate at
    the same context was already saturated (a higher one can only queue more). ``finished``:
    results with context, concurrency, output_tokens, rate and status (``CellResult``)."""
    for done in finished:
        same_shape = (
            done.concurrency == cell.concurrency
            and done.output_tokens == cell.output_tokens
            and getattr(done, "model", None) == cell.model
        )
        if not same_shape:
            continue
        rate = getattr(done, "rate", None)
        if done.status in skip_on and rate == cell.rate and done.context < cell.context:
            return f"context {done.context} was {done.status}"
        if (
            done.status == "saturated"
            and skip_higher_rates
            and rate is not None
            and cell.rate is not None
            and rate < cell.rate
            and done.context == cell.context
        ):
            return f"rate {rate:g}/s was saturated"
    return None


def check_models(campaign: CampaignConfig, session: Any) -> None:
    """``ConfigError`` naming ``campaign.models`` when the session cannot serve them: models need a
    llama-server router (``engine.router``); a models folder on this machine must have a
    ``<name>.gguf`` (or a ``<name>`` subfolder) for each (a presets file or a cluster's folder is the router's to judge)."""
    if campaign.models is None:
        return
    if not is_router(session.engine):
        raise ConfigError(
            f"campaign.models: {', '.join(campaign.models)} need a llama-server router tier "
            f"(engine.kind llama_server with engine.router); engine {session.engine.kind} serves one model"
        )
    folder = Path(session.model.path)
    if getattr(session.placement, "kind", "local") == "local" and folder.is_dir():
        served = sorted({p.stem for p in folder.glob("*.gguf")} | {p.name for p in folder.iterdir() if p.is_dir()})
        missing = [m for m in campaign.models if m not in served]
        if missing:
            raise ConfigError(
                f"campaign.models: {', '.join(missing)} not in {folder} (it serves {', '.join(served) or 'nothing'})"
            )


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

"""Typed results of the lifecycle steps; Prefect persists each one.

No secret is held here: the per-run API key lives in a mode-0600 file in the run folder and
results carry only its path, so a persisted result, log line or artifact never shows it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from llmflow.auth import bearer
from llmflow.bench.metrics import CellStatus, CellSummary, ServerFigures


class Allocation(BaseModel):
    """A node (or this machine) reserved for one run."""

    placement: str = Field(description="Placement kind: local, slurm, ...")
    run_id: str = Field(description="Id of this session; names the run folder and any job.")
    node: str = Field(description="Host the server will run on.")
    run_dir: Path = Field(description="Folder holding the server log, endpoint record and API key.")
    job_id: str | None = Field(default=None, description="Scheduler job id, when there is one.")
    remote_dir: str | None = Field(default=None, description="Run folder on the cluster, when not local.")
    started_at: datetime


class ServerHandle(BaseModel):
    """A started model server: enough to reach, watch and stop it."""

    engine: str
    run_id: str
    node: str
    host: str = Field(description="Address the server listens on, as seen from the node.")
    port: int
    pid: int | None = Field(default=None, description="Pid of the supervisor process that owns the server.")
    server_pid: int | None = Field(default=None, description="Pid of the server process itself.")
    api_key_file: Path | None = Field(default=None, description="Mode-0600 file with the per-run key.")
    log_path: Path | None = Field(
        default=None, description="Server log (on the node's filesystem for remote placements); None if not ours."
    )
    served_name: str
    job_id: str | None = None
    restarts: int = Field(default=0, description="How often the job was requeued before this server started.")
    workers: list[str] = Field(
        default_factory=list,
        description="A model split over nodes: each worker as 'node host:port', in rank order (the head is `node`).",
    )

    def api_key(self) -> str | None:
        """Read the per-run key from its private file (never stored on the model)."""
        if self.api_key_file is None:
            return None
        return self.api_key_file.read_text().strip()

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header this server expects (none when it takes no key)."""
        return bearer(self.api_key())


class Tunnel(BaseModel):
    """How the orchestrator reaches the server."""

    base_url: str = Field(description="Base URL the client uses, e.g. http://127.0.0.1:PORT")
    local_port: int
    forwarded: bool = Field(description="True when traffic goes through an SSH forward.")


class Ready(BaseModel):
    """The server answered a real request."""

    seconds_to_ready: float
    polls: int
    models: list[str]


class LineError(BaseModel):
    """An input line that was not sent, or a request that did not finish."""

    line: int = Field(description="1-based line number in the input file.")
    custom_id: str | None = None
    reason: str


class EndpointFigures(BaseModel):
    """What one replica did in a batch pass (and, filled in by the flow, where it ran)."""

    name: str = Field(description="The replica's run id.")
    answered: int = Field(description="Requests it gave a final answer to (any status).")
    succeeded: int
    prompt_tokens: int
    completion_tokens: int
    moved_away: int = Field(description="Requests that could not reach it and were sent to another replica.")
    busy_s: float | None = Field(default=None, description="From its first request sent to its last answer.")
    output_tok_per_s: float | None = None
    node: str | None = None
    job_id: str | None = None
    seconds_to_ready: float | None = None
    restarts: int = Field(default=0, description="Times Slurm restarted its job (a requeue) before it was ready.")
    state: str | None = Field(
        default=None, description="released (at the end), lost (replaced), retired (handed over near its time limit)."
    )
    replaces: str | None = Field(default=None, description="The lost replica it was started in place of.")


class BatchReport(BaseModel):
    """What one pass over the input did."""

    input_path: Path
    output_path: Path
    errors_path: Path
    input_lines: int
    already_done: int = Field(description="custom_ids found finished in the output before this pass.")
    sent: int
    succeeded: int = Field(description="Requests answered with a 2xx status this pass.")
    failed_http: int = Field(
        description="Requests answered with a final non-2xx status: a 4xx, or a 5xx (not 502-504) on every attempt."
    )
    failed_statuses: dict[int, int] = Field(default_factory=dict, description="failed_http by HTTP status.")
    unfinished: int = Field(
        description="Requests that got no answer (timeouts, connection errors, 502-504 to the end); a rerun sends them again."
    )
    invalid_lines: int = Field(description="Malformed lines and duplicate custom_ids.")
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    waited_s: float = Field(
        default=0.0,
        description="Of wall_s, the wait before the first request went out (for the first replica to be ready).",
    )
    retries: int
    moved: int = Field(default=0, description="Requests sent to another replica after theirs could not be reached.")
    endpoints: list[EndpointFigures] = Field(
        default_factory=list, description="Per replica, when the session has several (replicas > 1)."
    )
    stopped_early: bool = Field(
        default=False, description="The endpoint stopped answering, so the pass stopped sending; a rerun resumes."
    )
    server_counters: dict[str, float] | None = Field(
        default=None,
        description="What the server itself counted during the pass (vLLM /metrics deltas), beside the client's usage sums.",
    )
    server_timings: dict[str, float] | None = Field(
        default=None,
        description="Sums of the per-response `timings` (llama-server): prompt/predicted tokens and ms, and the rates.",
    )

    @property
    def finished(self) -> bool:
        """Every line got a final answer (or was invalid): nothing a rerun would send again."""
        return not (self.unfinished or self.stopped_early)

    @property
    def with_failures(self) -> bool:
        """Finished, but some lines were invalid or answered with an error."""
        return self.finished and bool(self.failed_http or self.invalid_lines)


class TokPS(BaseModel):
    """Throughput of one batch pass, from the server's `usage` figures."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    requests_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    summary_path: Path


class Teardown(BaseModel):
    """What was released; idempotent, so a second call reports nothing left."""

    run_id: str
    stopped_pids: list[int] = Field(default_factory=list)
    cancelled_job: str | None = None
    already_gone: bool = False
    not_ours: bool = Field(default=False, description="Nothing to release: the server was started by someone else.")
    node_hours: float = 0.0
    gpu_hours: float = 0.0
    released_at: datetime


class CellResult(BaseModel):
    """One campaign cell: its verdict, the client's and the server's figures, peak memory."""

    key: str = Field(
        description="ctx<prompt tokens>-c<concurrency>-out<output tokens>; open loop ctx<>-r<rate>-c<cap>-out<>"
    )
    context: int
    model: str | None = Field(
        default=None,
        description="The model the cell's requests named (a router tier's campaign); None: the served one.",
    )
    concurrency: int = Field(description="Requests in flight (closed loop), or the cap on them (open loop).")
    output_tokens: int
    rate: float | None = Field(default=None, description="Requests per second of an open-loop cell; None: closed loop.")
    status: CellStatus = Field(
        description="ok, rejected, crashed, timed_out, length_mismatch, saturated, skipped or not_run."
    )
    reason: str | None = Field(default=None, description="Why it was skipped or not run, or the first error seen.")
    requests: int = Field(default=0, description="Timed requests sent (warm-up not counted).")
    summary: CellSummary = Field(
        default_factory=CellSummary, description="The client's figures (bench.metrics.CELL_METRICS)."
    )
    server: ServerFigures = Field(
        default_factory=ServerFigures, description="The server's figures (bench.metrics.SERVER_METRICS)."
    )
    peak_rss_mib: float | None = Field(default=None, description="Server process group, local placement only.")
    peak_gpu_mib: float | None = Field(default=None, description="nvidia-smi memory.used, when present.")
    session: int = Field(default=0, description="Which server (1 = first; a crash starts the next).")
    model_state: str | None = Field(
        default=None,
        description="The cell's model as the router listed it before the cell (loaded, unloaded ...); None: no models.",
    )
    swap_ttft_ms: float | None = Field(
        default=None,
        description="TTFT of a 1-token probe sent first when the model was not loaded: the router's load (and eviction) included.",
    )
    warm_ttft_ms: float | None = Field(
        default=None,
        description="The same probe sent again at once, the model now loaded: what the swap is compared to.",
    )


class CampaignResult(BaseModel):
    """Where a campaign's outputs are and how its cells ended."""

    name: str
    output_dir: Path
    cells: list[CellResult]
    sessions: int = Field(description="Servers started: 1 plus one per restart after a crash.")
    regressions: list[dict] = Field(
        default_factory=list, description="Cells worse than the baseline beyond the threshold."
    )

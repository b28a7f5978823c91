"""Benchmark campaign flow: a grid of context sizes x concurrency x output length, measured
on one model session, with a new session after the server crashes; or, with
``campaign.capacity``, a search per context size for the highest load that holds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event

from flows.session import Session, model_session, release_session, with_blocks
from llmflow.bench import capacity as cap
from llmflow.bench.capacity_report import capacity_markdown, capacity_records, write_capacity
from llmflow.bench.cells import CellBook
from llmflow.bench.compare import compare_with_baseline, describe
from llmflow.bench.config import (
    CampaignConfig,
    Cell,
    campaign_path,
    cell_result,
    check_models,
    grid,
    load_campaign,
    skip_reason,
)
from llmflow.bench.model_report import models_markdown, models_summary, write_survival_tables
from llmflow.bench.report import (
    cell_record,
    cells_table,
    load_baseline,
    markdown_report,
    table_records,
    utc_stamp,
    write_outputs,
)
from llmflow.config import SessionConfig
from llmflow.errors import CampaignIncomplete, ServerDied
from llmflow.placements import driver_for
from llmflow.readiness import answers, with_deep_gate
from llmflow.results import CampaignResult, CellResult, ServerHandle, Tunnel
from tasks.benchmark import run_benchmark_cell


@flow(name="benchmark-campaign", on_crashed=[release_session], on_cancellation=[release_session], persist_result=True)
def benchmark_campaign(
    session: SessionConfig = SessionConfig(),
    campaign: CampaignConfig = CampaignConfig(),
    campaign_file: str | None = None,
    cluster_block: str | None = None,
    model_server_block: str | None = None,
) -> CampaignResult:
    """Measure TTFT, prefill and decode tok/s and survival over a grid of cells.

    Cells run smallest context first for each concurrency and output length; once a context is
    rejected the larger ones are skipped. A cell in which the server died is recorded as
    crashed, a new server is started (up to ``campaign.max_restarts`` times) and the campaign
    goes on, so one night still yields the whole table.

    Args:
        session: Where and how the model is served.
        campaign: The grid and how hard to push each cell.
        campaign_file: A TOML/YAML campaign under benchmarks/campaigns/; replaces ``campaign``, and
            ``session`` too when the file has a session table.
        cluster_block: Name of a saved Slurm Cluster block; replaces ``session.placement``.
        model_server_block: Name of a saved Model Server block; replaces ``session.engine`` and ``session.model``.
    """
    logger = get_run_logger()
    session, campaign = _resolve(session, campaign, campaign_file, cluster_block, model_server_block)
    check_models(campaign, session)
    session = with_deep_gate(session, largest_context=max(campaign.context_sizes, default=None))  # deep gate "auto"
    out_dir = campaign.resolved_output_dir(utc_stamp())
    baseline_path = campaign.resolved_baseline(out_dir)
    baseline = load_baseline(baseline_path) if baseline_path else None
    out_dir.mkdir(parents=True, exist_ok=True)
    if baseline_path:
        logger.info("comparing with %s", baseline_path)
    cells = [] if campaign.capacity else grid(campaign)
    if campaign.capacity:
        logger.info(
            "campaign %s: capacity search over %s (%s), at most %d cells, output in %s",
            campaign.name,
            campaign.capacity.dimension,
            ", ".join(f"{x:g}" for x in campaign.capacity.bracket()),
            _most_cells(campaign),
            out_dir,
        )
    else:
        logger.info("campaign %s: %d cells, output in %s", campaign.name, len(cells), out_dir)
    progress = create_progress_artifact(
        progress=0.0, key=artifact_key(campaign.name, "progress"), description=f"cells of {campaign.name}"
    )
    book = CellBook.open(
        campaign,
        cells,
        out_dir,
        lambda done, total: update_progress_artifact(
            progress, progress=100.0 * done / max(total, _most_cells(campaign) if campaign.capacity else 0)
        ),
    )
    if book.results:
        logger.info("resuming: %d cells already measured in %s", len(book.results), book.path)
    _plan(campaign, book)
    sessions, node, failure = _run_cells(session, campaign, book)

    ordered = book.ordered()
    meta = {
        "name": campaign.name,
        "engine": session.engine.kind,
        "model": ", ".join(campaign.models) if campaign.models else session.model.served_name,
        "model_path": str(session.model.path),
        "placement": session.placement.kind,
        "node": node,
        "sessions": sessions,
        "date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "campaign": campaign.model_dump(mode="json"),
        "baseline": str(baseline_path) if baseline_path else None,
    }
    comparison = (  # judged against the runs' own noise (llmflow/bench/compare.py)
        compare_with_baseline(
            [cell_record(c) for c in ordered],
            book.rows_path,
            baseline_path,
            baseline,
            campaign.regression_threshold,
            campaign.regression_confidence,
        )
        if baseline and baseline_path
        else None
    )
    meta["comparison"] = comparison.summary() if comparison else None
    regressions = comparison.regressions if comparison else []
    table = _capacity_table(campaign, ordered)
    paths = write_outputs(
        out_dir,
        ordered,
        book.rows_path,
        meta,
        regressions,
        extra={**({} if table is None else {"capacity": capacity_records(table)}), **models_summary(ordered)},
    )
    paths.update(write_survival_tables(out_dir, ordered))
    if table is not None:
        paths.update(write_capacity(out_dir, table, f"{campaign.name}: {meta['engine']} {meta['model']}"))
        for line in capacity_markdown(table).splitlines():
            if line.startswith("| ") and not line.startswith("| context"):
                logger.info("capacity %s", line)
    publish_campaign(meta, ordered, regressions, paths, campaign, table)
    for r in regressions:
        logger.warning("regression: %s", describe(r))
    logger.info("campaign %s done: %s; outputs in %s", campaign.name, _tally(ordered), out_dir)
    result = CampaignResult(
        name=campaign.name, output_dir=out_dir, cells=ordered, sessions=sessions, regressions=regressions
    )
    if failure is not None:
        raise CampaignIncomplete(
            f"{sum(c.status == 'not_run' for c in ordered)} cells not run: {failure}; results so far in {out_dir}"
        ) from failure
    return result


def _resolve(
    session: SessionConfig,
    campaign: CampaignConfig,
    campaign_file: str | None,
    cluster_block: str | None,
    model_server_block: str | None,
) -> tuple[SessionConfig, CampaignConfig]:
    """The session and campaign the parameters name: a campaign file (and its session table)
    over the inline forms, then saved blocks over the session's placement, engine and model."""
    if campaign_file:
        campaign, file_session = load_campaign(campaign_path(campaign_file))
        if file_session is not None:
            session = SessionConfig.model_validate({"runs_dir": session.runs_dir, **file_session})
    return with_blocks(session, cluster_block, model_server_block), campaign


def _run_cells(
    session: SessionConfig, campaign: CampaignConfig, book: CellBook
) -> tuple[int, str, BaseException | None]:
    """Every pending cell, on as many servers as crashes need (up to ``max_restarts`` more).

    Returns the number of the last server session, the node it ran on, and the error that
    left cells not run (None when every cell has a result).
    """
    logger = get_run_logger()
    sessions = book.last_session()
    first_session = sessions + 1
    node = "-"
    while _plan(campaign, book):
        if sessions - first_session + 1 > campaign.max_restarts:
            reason = f"the server crashed {campaign.max_restarts + 1} times (max_restarts {campaign.max_restarts})"
            for cell in book.pending():
                book.record(cell_result(cell, "not_run", reason=reason))
            break
        sessions += 1
        measuring = False
        try:
            with model_session(session) as s:
                node, measuring = s.allocation.node, True
                _cells_on_one_server(session, campaign, book, s, sessions)
        except Exception as exc:  # record the rest as not run and keep what was measured
            if sessions == first_session and not measuring:
                raise  # the campaign's first server did not come up: nothing was measured
            what = "the campaign failed" if measuring else "no server came up again"
            logger.error("%s: %s", what, exc)
            for cell in book.pending():
                reason = f"{what}: {type(exc).__name__}: {exc}"[:500]
                book.record(cell_result(cell, "not_run", reason=reason, session=sessions))
            return sessions, node, exc
    return sessions, node, None


def _cells_on_one_server(
    session: SessionConfig, campaign: CampaignConfig, book: CellBook, s: Session, session_no: int
) -> None:
    """Run (or skip) pending cells in order on the session's server until none is left (a
    capacity search plans its next cell from each result) or the server died during a cell."""
    logger = get_run_logger()
    while pending := _plan(campaign, book):
        cell = pending[0]
        reason = skip_reason(cell, book.results.values(), campaign.skip_larger_on, campaign.skip_higher_rates)
        if reason:
            book.record(cell_result(cell, "skipped", reason=reason, session=session_no))
            logger.info("cell %s skipped: %s", cell.key, reason)
        else:
            book.record(run_benchmark_cell(session, campaign, cell, s.handle, s.tunnel, book.rows_path, session_no))
        if book.results[cell.key].status == "crashed" and not _server_usable(session, s.handle, s.tunnel):
            left = len(_plan(campaign, book))
            logger.warning("the server died during cell %s; starting a new one for the %d cells left", cell.key, left)
            return


def _most_cells(campaign: CampaignConfig) -> int:
    """The most cells a capacity search can need: every context and output length's worst case."""
    search = campaign.capacity
    return search.most_cells() * len(campaign.context_sizes) * len(campaign.output_tokens) if search else 0


def _capacity_cell(campaign: CampaignConfig, output_tokens: int, context: int, load: float) -> Cell:
    """The cell a capacity search measures ``load`` with; the grid's first concurrency (and
    rate, if any) for the dimension not searched."""
    fields: dict = {"context": context, "concurrency": campaign.concurrencies[0], "output_tokens": output_tokens}
    if campaign.rates:
        fields["rate"] = campaign.rates[0]
    fields[campaign.capacity.dimension] = load
    return Cell(**fields)


def _plan(campaign: CampaignConfig, book: CellBook) -> list[Cell]:
    """The cells still to run. A grid's are all known at the start; a capacity search's next
    cell is planned from the results so far: per output length, then context (smallest first,
    so a rejected context spares the larger ones), the search's next load; the
    cells a resumed campaign recorded (``cells.jsonl``, in run order) taken into the book first."""
    pending = book.pending()
    if pending or campaign.capacity is None:
        return pending
    known = {c.key for c in book.cells}
    for done in book.results.values():
        if done.key not in known:
            book.cells.append(Cell(**{k: v for k, v in done.model_dump().items() if k in Cell.model_fields}))
            known.add(done.key)
    for out in campaign.output_tokens:
        for ctx in campaign.context_sizes:
            held = cap.measured(book.results.values(), campaign.capacity.dimension, out, ctx)
            load = cap.next_load(campaign.capacity, held)
            if load is not None:
                cell = _capacity_cell(campaign, out, ctx, load)
                if cell.key in known:  # a load the search measured under another key: stop, not loop
                    continue
                book.cells.append(cell)
                return [cell]
    return []


def _capacity_table(campaign: CampaignConfig, cells: list[CellResult]) -> list[dict] | None:
    if campaign.capacity is None:
        return None
    return cap.capacity_table(campaign.capacity, cells, campaign.context_sizes, campaign.output_tokens)


def _server_usable(session: SessionConfig, handle: ServerHandle, tunnel: Tunnel, settle_s: float = 3.0) -> bool:
    """After a crashed cell: is the same server still there and answering?

    The supervisor notices its server's death within half a second, so the placement's
    liveness check is repeated for ``settle_s`` before it is believed; a server that is up
    must then still answer its readiness path (a hung one gets replaced too).
    """
    driver = driver_for(session)
    deadline = time.monotonic() + settle_s
    while True:
        try:
            driver.check_alive(handle)
        except ServerDied:
            return False
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return answers(tunnel.base_url, handle, session.engine)


def _tally(cells: list[CellResult]) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def artifact_key(name: str, kind: str = "") -> str:
    """``campaign-[kind-]<name>`` in the lowercase letters, digits and dashes Prefect accepts as a key."""
    return f"campaign-{kind + '-' if kind else ''}{name}".lower().replace("_", "-").replace(".", "-")


def publish_campaign(
    meta: dict,
    cells: list[CellResult],
    regressions: list[dict],
    paths: dict[str, Path],
    campaign: CampaignConfig,
    capacity: list[dict] | None = None,
) -> None:
    """Table and markdown artifacts (and the capacity table's, for a capacity search), the plot
    as an image artifact when its folder has a URL, and an ``llmflow.campaign.finished`` event
    for automations."""
    key = artifact_key(campaign.name)
    create_table_artifact(
        table=table_records(cells_table(cells)), key=key, description=f"campaign {campaign.name}: one row per cell"
    )
    report = markdown_report(meta, cells, regressions, paths)
    if capacity is not None:
        create_table_artifact(
            table=capacity_records(capacity),
            key=artifact_key(campaign.name, "capacity"),
            description=f"campaign {campaign.name}: the highest {campaign.capacity.dimension} that held, per context",
        )
        report += "\n" + capacity_markdown(capacity)
    if by_model := models_markdown(cells):
        report += "\n" + by_model
    create_markdown_artifact(markdown=report, key=f"{key}-report", description="campaign report")
    if campaign.publish_url and "plot" in paths:
        create_image_artifact(
            image_url=f"{campaign.publish_url.rstrip('/')}/{paths['plot'].name}",
            key=f"{key}-plot",
            description="tok/s, TTFT and survival against context",
        )
    if campaign.publish_url and "capacity_plot" in paths:
        create_image_artifact(
            image_url=f"{campaign.publish_url.rstrip('/')}/{paths['capacity_plot'].name}",
            key=f"{key}-capacity-plot",
            description="the highest load that held against context",
        )
    emit_event(
        event="llmflow.campaign.finished",
        resource={"prefect.resource.id": f"llmflow.campaign.{campaign.name}", "prefect.resource.name": campaign.name},
        payload={
            "output_dir": str(paths["summary"].parent),
            "statuses": _tally(cells),
            "regressions": len(regressions),
        },
    )

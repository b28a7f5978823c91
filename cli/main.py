"""Command line: run the batch flow on a file, the demo, a benchmark campaign, write the tiny
model, clean up leftovers.

Exit codes: 0 every request answered 2xx (bench: the campaign ran; rejected or crashed cells
are measurements, not failures); 3 finished with failures: every line got a final answer, but
some were answered with an error (a 4xx, or a 5xx on every attempt) or were invalid (see the
errors file; ``--retry-errors`` sends the answered-with-error lines again); 4 (bench --fail-on-regression) a cell regressed against the baseline; 1 the run failed
(the message says why; rerun to resume); 2 invalid configuration; 130 interrupted (Ctrl-C or
SIGTERM), after tearing the server down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from cli import api as api_cli
from cli.prefect_api import connect
from llmflow import paths
from llmflow.batch import progress
from llmflow.batch.jsonl import summary_path_for
from llmflow.config import DEFAULT_MODEL, PROJECT_ROOT, SAMPLE_INPUT, BatchConfig, SessionConfig
from llmflow.config_files import load_config_file
from llmflow.errors import ConfigError
from llmflow.validation import config_problems, short_message

if TYPE_CHECKING:
    from llmflow.catalog import CatalogEntry

EXIT_FINISHED_WITH_FAILURES = 3
EXIT_INTERRUPTED = 130


def _config_file(path: Path | None) -> dict:
    """The ``--config`` JSON file (``llmflow.config_files.load_config_file``), or nothing."""
    return load_config_file(Path(path)) if path is not None else {}


def _session_config(args: argparse.Namespace, data: dict | None = None) -> SessionConfig:
    """The session from ``data`` (a campaign file's session table), else from ``--config`` and
    the engine flags; then ``--runs-dir`` and the block names. The file's relative paths are
    already taken from its folder, so resolving here only moves the flags' onto the working
    directory (``llmflow.paths``). With ``--catalog`` the session table is the catalog entry's
    and ``--model`` names that entry."""
    entry = _catalog_entry(args) if data is None else None
    if data is None:
        data = entry.session_table() if entry else _config_file(args.config).get("session", {})
        engine = data.setdefault("engine", {})
        if args.venv:
            engine["venv"] = str(args.venv)
        if args.n_ctx:
            engine["n_ctx"] = args.n_ctx
        if args.model and entry is None:
            data.setdefault("model", {})["path"] = args.model
        if getattr(args, "replicas", None):
            data["replicas"] = args.replicas
    if args.runs_dir:
        data["runs_dir"] = str(args.runs_dir)
    data = paths.resolve_session(data, Path.cwd())
    try:
        session = SessionConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(short_message(config_problems(exc, SessionConfig, "session."))) from None
    cluster_block = args.cluster_block or (entry.cluster_block if entry else None)
    model_server_block = args.model_server_block or (entry.model_server_block if entry else None)
    if cluster_block or model_server_block:
        connect()
        from flows.session import with_blocks

        session = with_blocks(session, cluster_block, model_server_block)
    return session


def _catalog_entry(args: argparse.Namespace) -> CatalogEntry | None:
    """With ``--catalog`` (or ``LLMFLOW_CATALOG``): the entry ``--model`` names, else the
    catalog's default. A name it has not is an error even when it has a default: a typo on the
    command line must not run another model."""
    if not getattr(args, "catalog", None):
        return None
    from llmflow.catalog import load_catalog
    from llmflow.errors import UnknownModel

    if "session" in _config_file(args.config):
        raise ConfigError(
            f"--config {args.config}: has a session table, and --catalog gives the session; leave one out"
        )
    try:
        return load_catalog(args.catalog).lookup(args.model)[1]
    except UnknownModel as exc:
        raise ConfigError(f"--catalog {args.catalog}, --model: {exc}") from None


def _batch_config(args: argparse.Namespace, input_path: Path, output_path: Path) -> BatchConfig:
    data: dict = _config_file(args.config).get("batch", {})
    data.update(input_path=input_path.absolute(), output_path=output_path.absolute())
    if args.concurrency:
        data["concurrency"] = args.concurrency
    if args.fixed_output_tokens:
        data["fixed_output_tokens"] = args.fixed_output_tokens
    if getattr(args, "retry_errors", False):
        data["retry_errors"] = True
    if getattr(args, "catalog", None):  # lines name catalog models; the server answers to its served name
        data["rewrite_model_to_served_name"] = True
    try:
        return BatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(short_message(config_problems(exc, BatchConfig, "batch."))) from None


def _preflight(session: SessionConfig, batch: BatchConfig | None = None) -> None:
    """What can be checked on this machine before Prefect or any server starts (well under a
    second): the input file, the engine's environment and the model (local placement), the SSH
    key file, secrets from the environment. The flow checks again (and reads Secret blocks)."""
    from llmflow.placements import driver_for

    if batch is not None:
        from llmflow.batch.embeddings import check_embeddings
        from llmflow.batch.input_check import check_input

        check_input(batch.input_path)
        check_embeddings(session, batch.input_path)
    driver_for(session).preflight(blocks=False)


def _invalid(command: str, exc: Exception) -> int:
    """Exit 2 with the message alone (it names the field, file or line): no traceback unless ``--debug``."""
    if os.environ.get("LLMFLOW_DEBUG") == "1":
        traceback.print_exc()
    print(f"llmflow {command}: {exc}", file=sys.stderr)
    return 2


def _quiet_prefect_console() -> None:
    """Prefect prints a traceback on the console for every failed task and flow, which buries the
    one useful line; without ``--debug`` the console shows each record's message alone (the
    Prefect API and UI still get the whole traceback)."""
    if os.environ.get("LLMFLOW_DEBUG") == "1":
        return
    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger()] + [
        x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, APILogHandler):
                if not getattr(handler, "_llmflow_quiet", False):
                    handler.format = _without_traceback(handler.format)  # type: ignore[method-assign]
                    handler._llmflow_quiet = True  # type: ignore[attr-defined]


def _without_traceback(format_record):
    def format(record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return format_record(record)

    return format


def _run_batch(session: SessionConfig, batch: BatchConfig) -> int:
    """Run the flow with a progress bar; print where the results are."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    connect(lambda text: console.print(f"[dim]{text}[/dim]"))  # before Prefect is first imported
    from prefect.exceptions import TerminationSignal  # Prefect's SIGTERM, while a flow runs

    from flows.batch import batch_inference  # imports Prefect: keep `--help` fast
    from llmflow.batch.report import failure_warning

    _quiet_prefect_console()
    with Progress(
        TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task_ids: list = []

        def on_progress(done: int, total: int) -> None:
            # the bar (and its clock) starts with the pass, not with the server's start-up
            if not task_ids:
                task_ids.append(bar.add_task("batch", total=total))
            bar.update(task_ids[0], completed=done, total=total)

        progress.add_listener(on_progress)
        try:
            result = batch_inference(session=session, batch=batch)
        except (KeyboardInterrupt, TerminationSignal):
            console.print(
                "[yellow]interrupted:[/yellow] the server was torn down; rerun the same command to resume",
                soft_wrap=True,
            )
            return EXIT_INTERRUPTED
        except Exception as exc:  # the flow's own message is the useful part
            return _failed("batch", exc, console)
        finally:
            progress.remove_listener(on_progress)
    r, t = result.report, result.tokps
    if result.nothing_to_send or t is None:
        print(f"output:   {r.output_path}  (nothing left to send: every request of {r.input_path.name} is in it)")
        print(f"summary:  {summary_path_for(r.output_path)}  (unchanged)")
        return 0
    print(
        f"output:   {r.output_path}  ({r.already_done} already done, {r.succeeded} ok, {r.failed_http} non-2xx this run)"
    )
    print(f"summary:  {t.summary_path}  ({t.requests_per_s:.2f} req/s, {t.output_tok_per_s:.1f} output tok/s)")
    if r.with_failures:
        what = [f"{r.failed_http} answered with an error"] if r.failed_http else []
        what += [f"{r.invalid_lines} invalid input lines"] if r.invalid_lines else []
        print(f"errors:   {r.errors_path}  ({', '.join(what)}; listed by line number)")
        if warning := failure_warning(r):
            console.print(f"[yellow]warning:[/yellow] {warning}")
        print("finished with failures")
        return EXIT_FINISHED_WITH_FAILURES
    return 0


def _failed(what: str, exc: Exception, console=None) -> int:
    """Exit 1 with the flow's own message, unwrapped (a terminal must not break a path in two)."""
    if os.environ.get("LLMFLOW_DEBUG") == "1":
        traceback.print_exception(exc)
    if console is not None:
        console.print(f"[red]{what} failed:[/red] {exc}", soft_wrap=True)
    else:
        print(f"{what} failed: {exc}", file=sys.stderr)
    return 1


def _hold(args: argparse.Namespace) -> int:
    """Hold a session open; print the URL, key and examples once ready; tear down at the end or on Ctrl-C."""
    try:
        session = _session_config(args)
        _preflight(session)
    except (ValidationError, ConfigError) as exc:
        return _invalid(args.command, exc)
    connect(lambda text: print(text, file=sys.stderr))  # before Prefect is first imported
    from prefect.exceptions import TerminationSignal

    from flows.hold import connection_help, hold_session, on_ready

    _quiet_prefect_console()

    on_ready(
        lambda s: print("\n" + connection_help(s) + f"\n\nheld for {args.hours} h; Ctrl-C ends it early\n", flush=True)
    )
    try:
        held = hold_session(session=session, hours=args.hours, check_every_s=args.check_every)
    except (KeyboardInterrupt, TerminationSignal):
        print("interrupted: the session was torn down", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the flow's message is the useful part
        return _failed("session", exc)
    if held.interrupted:
        print(f"interrupted after {held.hours} h: the session was torn down", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"session ended after {held.hours} h; torn down")
    return 0


DEFAULT_CAMPAIGN = PROJECT_ROOT / "benchmarks" / "campaigns" / "tiny-llama-cpp.toml"
EXIT_REGRESSION = 4


def _bench(args: argparse.Namespace) -> int:
    """Run a campaign file; print one line per cell and where the outputs are."""
    from llmflow.bench.config import check_models, load_campaign
    from llmflow.errors import CampaignFileError

    try:
        campaign, file_session = load_campaign(args.campaign)
        updates = {
            k: v
            for k, v in (("output_dir", args.resume or args.output_dir), ("baseline", args.baseline))
            if v is not None
        }
        if args.resume:
            updates["resume"] = True
        campaign = campaign.model_validate({**campaign.model_dump(), **updates})
        session = _session_config(args, dict(file_session or {}))
        if session.model.path == DEFAULT_MODEL and not DEFAULT_MODEL.exists():
            from llmflow.tiny_model import write_tiny_llama

            write_tiny_llama(DEFAULT_MODEL)
        check_models(campaign, session)
        _preflight(session)
    except (CampaignFileError, ValidationError, ConfigError) as exc:
        return _invalid(args.command, exc)

    connect(lambda text: print(text, file=sys.stderr))  # before Prefect is first imported
    from prefect.exceptions import TerminationSignal

    from flows.campaign import benchmark_campaign
    from llmflow.bench.compare import describe
    from llmflow.bench.report import output_names

    _quiet_prefect_console()

    try:
        result = benchmark_campaign(session=session, campaign=campaign)
    except (KeyboardInterrupt, TerminationSignal):
        print(
            "interrupted: the server was torn down; finish the campaign with --resume <its output folder>",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the flow's message is the useful part
        return _failed("campaign", exc)
    for c in result.cells:
        s = c.summary
        rates = (
            f"prefill {s.prefill_tok_per_s:.0f} tok/s, decode {s.decode_tok_per_s:.0f} tok/s, TTFT {s.mean_ttft_ms:.1f} ms"
            if c.status == "ok" and s.prefill_tok_per_s and s.decode_tok_per_s
            else (c.reason or "").splitlines()[0][:100]
            if c.reason
            else ""
        )
        print(f"{c.key:<24} {c.status:<16} {rates}")
    print(f"outputs:  {result.output_dir}  ({', '.join(output_names(result.output_dir))})")
    for r in result.regressions:
        print(f"regression: {describe(r)}")
    return EXIT_REGRESSION if result.regressions and args.fail_on_regression else 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    p.add_argument("--fixed-output-tokens", type=int, help="force each completion to exactly N tokens")
    p.add_argument(
        "--replicas", type=int, help="servers of the model to spread the batch over (default 1; on Slurm a job each)"
    )
    _add_session_options(p)


def _add_session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help=f"GGUF model (default {DEFAULT_MODEL.relative_to(PROJECT_ROOT)}); batch with --catalog: a catalog model name",
    )
    p.add_argument("--venv", type=Path, help="model server's virtual environment (default .venvs/llama_cpp)")
    p.add_argument("--n-ctx", type=int, help="server context length (default 2048)")
    p.add_argument("--config", type=Path, help='JSON file {"session": {...}, "batch": {...}}; flags override it')
    _add_where_options(p)


def _add_where_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks and the SSH library's own log (default: messages only)"
    )
    p.add_argument("--runs-dir", type=Path, help="where per-run folders (server log, key) go (default runs/)")
    p.add_argument("--cluster-block", help="run on the Slurm cluster saved as this SlurmCluster block")
    p.add_argument("--model-server-block", help="serve the engine and model saved as this ModelServer block")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmflow",
        description="Run self-hosted LLM batch inference as Prefect flows: allocate, serve, gate, batch, tear down.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("batch", help="run an OpenAI batch JSONL file through a model session")
    p.add_argument("input", type=Path, help="OpenAI batch input JSONL")
    p.add_argument("-o", "--output", type=Path, required=True, help="output JSONL (resumed if it exists)")
    p.add_argument(
        "--retry-errors", action="store_true", help="send again the lines the output has as answered with an error"
    )
    p.add_argument(
        "--catalog",
        metavar="FILE",
        default=os.environ.get("LLMFLOW_CATALOG") or None,
        help="model catalog (TOML/YAML/JSON): --model names its entry (default: its default model), every line is "
        "sent under the entry's served name (default $LLMFLOW_CATALOG; '' for none)",
    )
    _add_run_options(p)

    p = sub.add_parser("demo", help="tiny model, local placement, llama.cpp, the bundled 240-request sample")
    p.add_argument("-o", "--output", type=Path, default=PROJECT_ROOT / "out" / "sample_output.jsonl")
    _add_run_options(p)

    p = sub.add_parser("hold", help="serve the model for some hours and print how to reach it (interactive use)")
    p.add_argument("--hours", type=float, default=1.0, help="how long to hold the session (default 1)")
    p.add_argument("--check-every", type=float, default=30.0, help="seconds between health checks (default 30)")
    p.add_argument(
        "--replicas", type=int, help="servers of the model behind one nginx URL (default 1; on Slurm a job each)"
    )
    _add_session_options(p)

    p = sub.add_parser("bench", help="run a stress-test campaign (context sizes x concurrency) from a TOML/YAML file")
    p.add_argument(
        "campaign",
        type=Path,
        nargs="?",
        default=DEFAULT_CAMPAIGN,
        help=f"campaign file (default {DEFAULT_CAMPAIGN.relative_to(PROJECT_ROOT)})",
    )
    p.add_argument("--output-dir", type=Path, help="where the outputs go (default out/campaigns/<name>-<time>)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="finish a stopped campaign in its output folder DIR (measured cells are kept)",
    )
    p.add_argument("--baseline", type=Path, help="an earlier campaign's summary.json to compare against")
    p.add_argument("--fail-on-regression", action="store_true", help=f"exit {EXIT_REGRESSION} when a cell regressed")
    _add_where_options(p)

    p = sub.add_parser("make-model", help="write the tiny random Llama GGUF model (offline)")
    p.add_argument("path", type=Path, nargs="?", default=DEFAULT_MODEL)

    p = sub.add_parser(
        "server", help="a local Prefect server (API and UI) that later commands reuse: they start faster"
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (default 4200)")

    p = sub.add_parser("cleanup", help="list or release servers left by runs whose process died")
    p.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs")
    p.add_argument("--list", action="store_true", help="only list leases (a table), release nothing")
    p.add_argument("--json", action="store_true", help="with --list: the leases as JSON, for scripts")

    api_cli.add_parser(sub)
    return parser


def _server(args: argparse.Namespace) -> int:
    from cli import prefect_api

    if args.action == "start":
        try:
            prefect_api.start_server(args.port)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    elif args.action == "stop":
        prefect_api.stop_server()
    else:
        record = prefect_api.local_server()
        print(f"running: {record['ui_url']} (pid {record['pid']})" if record else "not running")
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # This machine (and many clusters) cannot reach Prefect's telemetry endpoint.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # `kill` (SIGTERM) takes the same path as Ctrl-C: the session's finally tears everything down.
    signal.signal(signal.SIGTERM, _interrupt)
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ["LLMFLOW_DEBUG"] = "1"
    if args.command == "make-model":
        from llmflow.tiny_model import write_tiny_llama

        out = write_tiny_llama(args.path)
        print(f"wrote {out}")
        return 0
    if args.command == "cleanup":
        from llmflow.placements import describe, lease_table, release_leftovers
        from llmflow.remote.leases import all_leases, dump

        if args.list or args.json:
            rows = [describe(lease) for _, lease in all_leases(args.runs_dir)]
            print(dump(rows) if args.json else lease_table(rows))
            return 0
        released = release_leftovers(args.runs_dir)
        print(
            f"released {len(released)} leftover server(s)"
            + "".join(
                f"\n  {x.run_id} ({x.placement}: " + (f"job {x.job_id}" if x.job_id else f"pgid {x.pgid}") + ")"
                for x in released
            )
        )
        return 0

    if args.command == "server":
        return _server(args)
    if args.command == "api":
        return api_cli.run(args)
    if args.command == "hold":
        return _hold(args)
    if args.command == "bench":
        return _bench(args)
    input_path = SAMPLE_INPUT if args.command == "demo" else args.input
    try:
        session = _session_config(args)
        batch = _batch_config(args, input_path, args.output)
        if args.command == "demo" and not session.model.path.exists():
            from llmflow.tiny_model import write_tiny_llama

            write_tiny_llama(session.model.path)
        _preflight(session, batch)
    except (ValidationError, ConfigError) as exc:
        return _invalid(args.command, exc)
    return _run_batch(session, batch)


if __name__ == "__main__":
    sys.exit(main())

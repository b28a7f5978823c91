"""``llmflow api``: serve the OpenAI-compatible Files and Batches API, and manage its keys.

Flags override ``LLMFLOW_API_*`` environment variables (``api.settings``). The keys
commands touch only the database (no Prefect import: they answer in well under a second).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.settings import ApiSettings

EXIT_INVALID = 2


def _add_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="files and the SQLite database (default ~/.llmflow/api)")
    p.add_argument("--database-url", help="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``api`` (``serve``, ``keys create|list|revoke``) to the top-level subcommands."""
    p = subparsers.add_parser("api", help="an OpenAI-compatible Files and Batches API; each batch runs as flow runs")
    sub = p.add_subparsers(dest="api_command", required=True)

    s = sub.add_parser("serve", help="serve the API (and supervise its batches) until Ctrl-C")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8080)")
    _add_state_options(s)
    s.add_argument("--catalog", type=Path, help="model catalog: which served model each request's model means")
    s.add_argument("--deployment", help="the Prefect deployment a batch runs as (default batch-inference/batch)")
    s.add_argument(
        "--no-supervisor",
        action="store_true",
        help="serve the HTTP API only: batches stay as created (benchmarks, debugging)",
    )

    k = sub.add_parser("keys", help="create, list or revoke API keys")
    keys = k.add_subparsers(dest="keys_command", required=True)
    c = keys.add_parser("create", help="create a key; its secret is printed once")
    c.add_argument("name", help="who or what the key is for")
    _add_state_options(c)
    _add_state_options(keys.add_parser("list", help="every key: id, name, prefix, created, revoked"))
    r = keys.add_parser("revoke", help="revoke a key (its next request is refused)")
    r.add_argument("id", help="the key's id (key_..., from `llmflow api keys list`)")
    _add_state_options(r)


def settings_from(args: argparse.Namespace) -> ApiSettings:
    """ApiSettings from the environment, the flags given on top."""
    from api.settings import ApiSettings

    flags = ("host", "port", "data_dir", "database_url", "catalog", "deployment")
    return ApiSettings(**{k: v for k in flags if (v := getattr(args, k, None)) is not None})


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"llmflow api: {problems}", file=sys.stderr)
        return EXIT_INVALID
    if args.api_command == "serve":
        return _serve(settings, supervise=not args.no_supervisor)
    return asyncio.run(_keys(args, settings))


def _serve(settings: ApiSettings, *, supervise: bool) -> int:
    import uvicorn
    from sqlalchemy.engine import make_url

    if supervise and (problem := _supervisor_problem(settings)):
        print(f"llmflow api serve: {problem}", file=sys.stderr)
        return EXIT_INVALID
    from api.app import create_app

    database = make_url(settings.db_url).render_as_string(hide_password=True)
    print(f"llmflow api: data {settings.data_dir}, database {database}", file=sys.stderr)
    if not supervise:
        print("llmflow api: --no-supervisor: batches stay as they are created", file=sys.stderr)
    uvicorn.run(create_app(settings, supervise=supervise), host=settings.host, port=settings.port, log_level="info")
    return 0


def _supervisor_problem(settings: ApiSettings) -> str | None:
    """Why batches could not run, checked before serving: a catalog that does not load, no
    Prefect server (a temporary one has no worker: every batch would wait for ever), or no
    deployment to run them as."""
    from llmflow.errors import ConfigError

    if settings.catalog is not None:
        from llmflow.catalog import load_catalog

        try:
            load_catalog(settings.catalog)
        except ConfigError as exc:
            return str(exc)
    from cli.prefect_api import local_server

    url = os.environ.get("PREFECT_API_URL") or (local_server() or {}).get("api_url")
    if not url:
        return (
            "batches run on a Prefect server with a worker: set PREFECT_API_URL to one, or start one with "
            "`llmflow server start` (the README's 'In the Prefect UI' section has the worker and deploy steps)"
        )
    os.environ["PREFECT_API_URL"] = url  # before Prefect is imported
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(settings.deployment)
    except ObjectNotFound:
        return f"the Prefect server at {url} has no deployment {settings.deployment}: run deployments/deploy.py"
    except Exception as exc:  # refused, timed out, not a Prefect API
        return f"the Prefect API at {url} does not answer ({type(exc).__name__}: {exc})"
    return None


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


async def _keys(args: argparse.Namespace, settings: ApiSettings) -> int:
    from api import keys
    from api.db import create_tables, make_engine, sessions
    from api.files import make_dirs

    if settings.database_url is None:
        make_dirs(settings)  # the SQLite file lives in data_dir
    engine = make_engine(settings.db_url)
    try:
        await create_tables(engine)
        async with sessions(engine)() as session:
            if args.keys_command == "create":
                try:
                    row, secret = await keys.create_key(session, args.name)
                except ValueError as exc:
                    print(f"llmflow api keys create: {exc}", file=sys.stderr)
                    return EXIT_INVALID
                print(f"created {row.id} ({row.name}); its secret, shown only now:")
                print(secret)
                return 0
            if args.keys_command == "list":
                rows = await keys.list_keys(session)
                table = [("ID", "NAME", "PREFIX", "CREATED", "REVOKED")] + [
                    (r.id, r.name, r.prefix + "...", _when(r.created_at), _when(r.revoked_at)) for r in rows
                ]
                widths = [max(len(row[i]) for row in table) for i in range(4)]
                for row in table:
                    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
                return 0
            row = await keys.revoke_key(session, args.id)
            if row is None:
                print(f"llmflow api keys revoke: no key {args.id!r} (see `llmflow api keys list`)", file=sys.stderr)
                return 1
            print(f"revoked {row.id} ({row.name}) at {_when(row.revoked_at)}")
            return 0
    finally:
        await engine.dispose()

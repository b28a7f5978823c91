"""A real Prefect stack for integration tests: `prefect server start` (SQLite, or a private
PostgreSQL), a process work pool and worker, the project's deployments, a client pointed at it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from llmflow.config import PROJECT_ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def prefect_server_and_worker(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port with its own home, a process work pool and a
    worker on it; yields the environment that points a client or CLI at it. Stops both after."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        **(extra_env or {}),
    }
    port = url.rsplit(":", 1)[1].split("/")[0]
    logs = home / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env,
        stdout=(logs / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not come up in 120 s"
            time.sleep(0.5)
        subprocess.run(
            [PREFECT, "work-pool", "create", "llmflow", "--type", "process"],
            env=env,
            check=True,
            capture_output=True,
            cwd=PROJECT_ROOT,
        )
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "llmflow", "--prefetch-seconds", "1"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=(logs / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        yield env
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


@contextmanager
def postgres() -> Iterator[tuple[str, list[str]]]:
    """A private PostgreSQL instance (Debian's packages, run as the postgres user) on a free
    loopback port; yields its asyncpg URL and a psql command line for it. Removed after."""
    (bindir,) = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1:]
    root = Path(tempfile.mkdtemp(prefix="llmflow-pg-"))  # not under pytest's 0700 root-only tmp
    data, port = root / "pgdata", free_port()
    shutil.chown(root, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "prefect"],
            check=True,
            capture_output=True,
        )
        psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "prefect", "-tAc"]
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", psql
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def prefect_client(env: dict[str, str]):
    """A client of this module's server (settings are read once per process: override them here)."""
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        yield client


def deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    """What a user runs from a fresh clone (see deployments/deploy.py for why not `prefect deploy`)."""
    return subprocess.run(
        [sys.executable, "deployments/deploy.py"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_state(client, flow_run_id: UUID, done: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.type.value in done:
            return state.type.value
        assert time.monotonic() < deadline, f"flow run still {state.type.value if state else None} after {timeout:.0f}s"
        time.sleep(1)

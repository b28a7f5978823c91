"""Which Prefect API a command talks to, and how it gets one fast on an idle machine and at all
on a busy one.

In order: ``PREFECT_API_URL`` when it is set (a team's Prefect server); else the local server
that ``llmflow server start`` left running (its address in ``$PREFECT_HOME/llmflow-server.json``,
used when it answers); else Prefect's temporary server, started here. Measured on this 2-core
machine (``benchmarks/cli_startup.py``): ``llmflow demo`` reached its first answer after 15.0 s
cold and 7.8 s warm with the temporary server, 2.5-3.2 s with a running local server; with six
busy processes on two cores the temporary server did not answer within Prefect's default 20 s
start timeout and the command failed. So the temporary server gets ``START_TIMEOUT_S`` (unless
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` says otherwise), and is registered with
the orphan guard: a command killed outright does not leave it behind (Prefect stops it only
at a normal exit).

The setting must be in the environment before Prefect is first imported, so ``connect`` runs
before any flow module is imported.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmflow import orphans
from llmflow.remote.procs import stop_group

START_TIMEOUT_S = 300
STATE_FILE = "llmflow-server.json"
DEFAULT_PORT = 4200

_connected: str | None = None


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE_FILE


def _answers(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def local_server() -> dict | None:
    """The record of a running ``llmflow server``, if it answers."""
    try:
        record = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    return record if _answers(record["api_url"]) else None


def connect(say=print) -> str:
    """Point this process at a Prefect API (see the module's docstring); its URL. Idempotent."""
    global _connected
    if _connected:
        return _connected
    if url := os.environ.get("PREFECT_API_URL"):
        _connected = url
        return url
    if (record := local_server()) is not None:
        os.environ["PREFECT_API_URL"] = _connected = record["api_url"]
        say(f"Prefect: the local server at {record['ui_url']} (`llmflow server stop` ends it)")
        return _connected
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(START_TIMEOUT_S))
    from prefect.server.api.server import SubprocessASGIServer  # the instance Prefect's clients reuse

    server = SubprocessASGIServer()
    started = time.monotonic()
    server.start()
    assert server.server_process is not None
    pid = server.server_process.pid
    orphans.stop_process_with_this_process(pid)
    atexit.register(orphans.forget_process, pid)  # runs before Prefect's own stop (atexit is LIFO)
    took = time.monotonic() - started
    if took > 10:
        say(f"Prefect's temporary server took {took:.0f}s to start; `llmflow server start` keeps one running")
    _connected = server.api_url
    return _connected


def start_server(port: int = DEFAULT_PORT, say=print) -> dict:
    """Start a local Prefect server (with its UI) in the background, for later commands to reuse."""
    if (record := local_server()) is not None:
        say(f"already running: {record['ui_url']}")
        return record
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "llmflow-server.log"
    prefect_cli = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command on purpose; `llmflow server stop` ends it
            env=env,
        )
    api_url, ui_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc.pid)
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the Prefect server did not start (see {log}): {' | '.join(tail)}")
        time.sleep(0.2)
    record = {"api_url": api_url, "ui_url": ui_url, "pid": proc.pid, "log": str(log)}
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(_state_path())
    say(f"Prefect server at {ui_url} (UI and API); later llmflow commands use it; log {log}")
    return record


def stop_server(say=print) -> bool:
    """Stop the server ``start_server`` started; True if one was running."""
    try:
        record = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        say("no llmflow Prefect server is recorded")
        return False
    stopped = stop_group(int(record["pid"]))
    _state_path().unlink(missing_ok=True)
    say(f"stopped the Prefect server at {record['ui_url']}" if stopped else "it was not running")
    return stopped

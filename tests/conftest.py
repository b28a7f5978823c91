"""Session-wide test harness.

Unit tests need nothing running. Integration tests (marked ``integration``) use the real
llama-cpp-python server from ``.venvs/llama_cpp`` and the tiny model that ``make setup``
writes, and one Prefect server for the whole session (``prefect_test_harness``) with
``PREFECT_HOME`` in a temp folder, so nothing touches the user's ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_HOME = tempfile.mkdtemp(prefix="llmflow-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME

from llmflow.config import DEFAULT_LLAMA_SERVER, DEFAULT_MODEL, DEFAULT_SERVER_VENV, PROJECT_ROOT, TINY_HF_MODEL  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """One real Prefect API server for the session; its URL for subprocesses too."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def server_env() -> tuple[Path, Path]:
    """The model server's venv and the tiny model; a clear failure (not a skip) when missing."""
    python = DEFAULT_SERVER_VENV / "bin" / "python"
    missing = [str(p) for p in (python, DEFAULT_MODEL) if not p.exists()]
    if missing:
        pytest.fail(f"integration tests need `make setup` first; missing: {', '.join(missing)}")
    return DEFAULT_SERVER_VENV, DEFAULT_MODEL


@pytest.fixture(scope="session")
def vllm_env() -> tuple[Path, Path]:
    """vLLM's venv and the tiny HF checkpoint; a clear failure (not a skip) when missing."""
    venv = PROJECT_ROOT / ".venvs" / "vllm"
    missing = [str(p) for p in (venv / "bin" / "python", TINY_HF_MODEL / "model.safetensors") if not p.exists()]
    if missing:
        pytest.fail(f"vLLM tests need `make setup` first; missing: {', '.join(missing)}")
    return venv, TINY_HF_MODEL


@pytest.fixture(scope="session")
def llama_server_bin(server_env) -> Path:
    """llama.cpp's native llama-server, built by scripts/build_llama_server.sh; a failure when missing."""
    if not os.access(DEFAULT_LLAMA_SERVER, os.X_OK):
        pytest.fail(
            f"llama-server tests need `make setup` (scripts/build_llama_server.sh) first; missing: {DEFAULT_LLAMA_SERVER}"
        )
    return DEFAULT_LLAMA_SERVER


def llama_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker`` (a run folder, a port)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue  # the test process itself (tmp_path names contain "pytest": never filter on that)
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(text)
    return found


@pytest.fixture(scope="session")
def test_cluster() -> dict[str, str]:
    """The real multi-node Slurm cluster and loopback sshd of scripts/test_cluster.sh (brought up if needed)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([str(root / "scripts" / "test_cluster.sh"), "up"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"the test cluster did not come up:\n{proc.stdout}\n{proc.stderr}")
    env_file = root / "build" / "testcluster" / "env"
    return dict(line.strip().split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


def wait_until(cond, timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``cond`` until it is true or ``timeout_s`` passed; its last answer."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return bool(cond())


def child_pids(pid: int, needle: str) -> list[int]:
    """Processes started by ``pid`` whose command line contains ``needle``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and needle in cmdline:
            found.append(int(stat.parent.name))
    return found


def pid_gone(pid: int) -> bool:
    """``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def orphan_lease(run_dir: Path) -> Path:
    """Make the run's lease look like its flow process was killed (owner: a pid that has exited)."""
    import json
    import subprocess
    import sys

    from llmflow.remote.leases import LEASE_FILE

    lease_file = run_dir / LEASE_FILE
    data = json.loads(lease_file.read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data.update(owner_pid=int(dead.stdout), owner_start=None)
    lease_file.write_text(json.dumps(data))
    return lease_file


async def serve_aiohttp(handler, paths=("/v1/completions", "/v1/chat/completions")):
    """A small real aiohttp server on a free loopback port answering POSTs to ``paths`` with
    ``handler``; returns its runner (``await runner.cleanup()`` stops it) and base URL."""
    from aiohttp import web

    app = web.Application()
    for path in paths:
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def kill_server_during_cell(rows_path: Path, cell_key: str, endpoints: Path, timeout_s: float = 600):
    """Start a thread that SIGKILLs the campaign's model server as soon as ``cell_key`` has its
    first request row in ``rows_path``; the server's pid comes from the ``endpoint.json``
    files under ``endpoints``. Returns the thread and the list of pids it killed."""
    import json
    import signal
    import threading
    import time

    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not killed:
            if rows_path.exists() and f'"cell":"{cell_key}"' in rows_path.read_text():
                for ep in endpoints.glob("*/endpoint.json"):
                    pid = json.loads(ep.read_text())["server_pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def pytest_sessionfinish(session, exitstatus) -> None:
    """Write the fault matrix rows the fault tests measured (``tests/fault_matrix.py``)."""
    from tests import fault_matrix

    fault_matrix.write()

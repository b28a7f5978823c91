"""Make docs/prefect-ui-*.png: the Prefect UI showing a finished batch run of this project.

Starts `prefect server start` (SQLite, a temporary PREFECT_HOME) on a free loopback port, runs
the batch flow on the tiny model (local placement, 40 sample requests) against it, and has
Debian's headless Chromium (`apt-get install chromium`) photograph the run's page and its
markdown report artifact. Nothing is left running.

    .venv/bin/python scripts/ui_screenshot.py [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("prefect server exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("prefect server did not answer /health")


def shoot(chromium: str, url: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1600,1000",
                "--virtual-time-budget=20000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {path} ({path.stat().st_size} bytes) from {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("needs Debian's chromium: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmflow-ui-"))
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": f"{ui}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(work / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(f"{ui}/api", server)
        sample = (ROOT / "llmflow" / "data" / "sample_batch.jsonl").read_text().splitlines(keepends=True)[:40]
        (work / "in.jsonl").write_text("".join(sample))
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sys; from flows.batch import batch_inference; from llmflow.config import BatchConfig, SessionConfig;"
                "from prefect.runtime import flow_run;"
                f"r = batch_inference.with_options(name='batch-inference')(session=SessionConfig(runs_dir={str(work / 'runs')!r}),"
                f" batch=BatchConfig(input_path={str(work / 'in.jsonl')!r}, output_path={str(work / 'out.jsonl')!r}, fixed_output_tokens=16));"
                "print(json.dumps(r.report.model_dump(mode='json')))",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return 1
        flow_runs = httpx.post(f"{ui}/api/flow_runs/filter", json={"limit": 1, "sort": "START_TIME_DESC"}).json()
        run_id = flow_runs[0]["id"]
        print(f"flow run {run_id}: {json.loads(run.stdout.strip().splitlines()[-1])['succeeded']} requests ok")
        shoot(chromium, f"{ui}/runs/flow-run/{run_id}", args.out / "prefect-ui-run.png")
        artifacts = httpx.post(
            f"{ui}/api/artifacts/filter", json={"limit": 10, "flow_runs": {"id": {"any_": [run_id]}}}
        ).json()
        report = next(a for a in artifacts if a["key"] == "batch-report")
        shoot(chromium, f"{ui}/artifacts/artifact/{report['id']}", args.out / "prefect-ui-report.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

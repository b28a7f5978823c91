"""How long from typing a command to its first answer? ``llmflow demo`` with each way of reaching
Prefect's API, side by side in one run.

Three ways, interleaved, ``--repeats`` times each:

* ``temporary, cold``: a fresh PREFECT_HOME, no server: Prefect's temporary server starts and
  creates its database (a user's first command);
* ``temporary, warm``: the same PREFECT_HOME again (the database exists; the server still starts);
* ``local server``: ``llmflow server start`` ran once before (not timed here; its start time is
  reported on its own), later commands reuse it.

Measured per run: seconds from starting the command to the first record in the output file (the
first request sent and answered: the tiny model answers in milliseconds), and to the command's
end. ``--busy N`` runs N CPU burners for the whole benchmark (a busy login node).

Run: ``.venv/bin/python benchmarks/cli_startup.py [--repeats 3] [--busy 0]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMFLOW = [sys.executable, "-m", "cli.main"]


def run_demo(env: dict[str, str], workdir: Path) -> tuple[float | None, float, int]:
    """(seconds to the first output record, seconds to the end, exit code) of one ``llmflow demo``."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "out.jsonl"
    started = time.monotonic()
    proc = subprocess.Popen(
        [*LLMFLOW, "demo", "-o", str(out), "--runs-dir", str(workdir / "runs")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and out.stat().st_size:
            first = time.monotonic() - started
        time.sleep(0.01)
    return first, time.monotonic() - started, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="CPU burners running for the whole benchmark")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmflow-startup-"))
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    server_home = work / "server-home"
    server_env = {**base, "PREFECT_HOME": str(server_home)}
    results: dict[str, list[tuple[float | None, float, int]]] = {}
    try:
        t0 = time.monotonic()
        subprocess.run([*LLMFLOW, "server", "start", "--port", "4291"], env=server_env, cwd=ROOT, check=True)
        server_start = time.monotonic() - t0
        for i in range(args.repeats):
            home = {**base, "PREFECT_HOME": str(work / f"home-{i}")}
            results.setdefault("temporary, cold", []).append(run_demo(home, work))
            results.setdefault("temporary, warm", []).append(run_demo(home, work))
            results.setdefault("local server", []).append(run_demo(server_env, work))
    finally:
        subprocess.run([*LLMFLOW, "server", "stop"], env=server_env, cwd=ROOT)
        for b in burners:
            b.kill()
    print(f"\n{args.busy} CPU burners; `llmflow server start` took {server_start:.1f}s (once)\n")
    print(f"| way | first record s (median of {args.repeats}) | runs | whole command s | failed |")
    print("| --- | --- | --- | --- | --- |")
    for way, runs in results.items():
        firsts = [f for f, _, rc in runs if f is not None and rc == 0]
        first = f"{statistics.median(firsts):.1f}" if firsts else "-"
        each = ", ".join("-" if f is None else f"{f:.1f}" for f, _, _ in runs)
        whole = statistics.median(t for _, t, _ in runs)
        print(f"| {way} | {first} | {each} | {whole:.1f} | {sum(rc != 0 for _, _, rc in runs)} |")


if __name__ == "__main__":
    main()

"""The README's runnable examples, executed as written from a folder that is not the repository
root: the vLLM config (it used to look for `.venvs/vllm` in the run folder), the demo, and the
commands that list what is held."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from llmflow.config import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
LLMFLOW = [sys.executable, "-m", "cli.main"]


def _run(args: list[str], cwd: Path, prefect_api_url: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([*LLMFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _vllm_example() -> tuple[str, list[str]]:
    """The README's vLLM config block and the command line that follows it, verbatim."""
    config = next(b for b in re.findall(r"```json\n(.*?)```", README, re.S) if '".venvs/vllm"' in b)
    line = re.search(r"`\.venv/bin/llmflow (batch [^`]*--config vllm\.json)`", README)
    assert line, "the README no longer shows the vLLM command"
    return config, shlex.split(line.group(1))


def test_the_vllm_example_runs_as_written_from_another_folder(vllm_env, tmp_path: Path, prefect_api_url):
    config, args = _vllm_example()
    checkout = tmp_path / "checkout"  # a folder laid out as the README's: .venvs, models, the config
    checkout.mkdir()
    for name in (".venvs", "models", "llmflow"):
        (checkout / name).symlink_to(PROJECT_ROOT / name)
    (checkout / "vllm.json").write_text(config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # command-line paths are relative to the working directory: name the checkout's files from elsewhere
    args = [str(checkout / a) if (checkout / a).exists() else a for a in args]
    proc = _run([*args, "--runs-dir", str(tmp_path / "runs")], elsewhere, prefect_api_url, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = elsewhere / "out" / "vllm.jsonl"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    sample = (PROJECT_ROOT / "llmflow" / "data" / "sample_batch.jsonl").read_text().splitlines()
    assert len(records) == len(sample) and all(r["response"]["status_code"] == 200 for r in records)
    assert not list((tmp_path / "runs").glob("*/.venvs"))  # nothing was looked for in a run folder


def test_the_demo_and_the_listing_commands_run_from_another_folder(server_env, tmp_path: Path, prefect_api_url):
    out = tmp_path / "demo.jsonl"
    proc = _run(["demo", "-o", str(out), "--runs-dir", str(tmp_path / "runs")], tmp_path, prefect_api_url, 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 240 and "output:" in proc.stdout
    listing = _run(["cleanup", "--list", "--runs-dir", str(tmp_path / "runs")], tmp_path, prefect_api_url, 60)
    assert listing.returncode == 0 and listing.stdout.strip() == "no leases: nothing is held"

"""The ssh placement's remote commands, run here with bash against real processes (no SSH)."""

from __future__ import annotations

import subprocess
import time

from llmflow.placements.ssh import alive_command, start_command, stop_command


def _sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)


def test_start_returns_at_once_with_the_group_id_and_stop_ends_the_group(tmp_path):
    (tmp_path / "start.sh").write_text("sleep 300 & sleep 300\n")
    started = time.monotonic()
    res = _sh(start_command(str(tmp_path)))
    assert time.monotonic() - started < 5  # the command must not wait for the server
    pgid = int(res.stdout.strip())
    assert _sh(alive_command(pgid)).returncode == 0
    assert _sh(stop_command(pgid, grace_s=5)).returncode == 0  # 0: it was running and is gone now
    assert _sh(alive_command(pgid)).returncode != 0
    assert _sh(stop_command(pgid, grace_s=5)).returncode == 3  # 3: already gone


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path):
    (tmp_path / "start.sh").write_text("trap '' TERM; sleep 300 & wait\n")
    pgid = int(_sh(start_command(str(tmp_path))).stdout.strip())
    time.sleep(0.3)
    assert _sh(stop_command(pgid, grace_s=1)).returncode == 0
    assert _sh(alive_command(pgid)).returncode != 0


def test_start_command_quotes_the_folder(tmp_path):
    folder = tmp_path / "it's a dir"
    folder.mkdir()
    (folder / "start.sh").write_text("echo started > marker\n")
    _sh(start_command(str(folder)))
    deadline = time.monotonic() + 5
    while not (folder / "marker").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (folder / "marker").read_text() == "started\n"

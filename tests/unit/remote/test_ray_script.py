"""The pieces of the vLLM-over-Ray job body (``remote.ray_script``) that run on the head: the
wait for the Ray cluster fails at once naming a rank that ended, or names what it waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmflow.remote import multinode, ray_script
from llmflow.remote.ray_script import FREE_PORTS, RESOLVE, WAIT_FOR_NODES, shell_words


def _wait(address: str, procs: str, folder: Path, timeout_s: float = 5) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-", address, "2", str(timeout_s), procs, str(folder)],
        input=WAIT_FOR_NODES,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ranks_are_laid_out_as_for_rpc_workers():
    assert (ray_script.WORKERS_DIR, ray_script.WORKER_PROCS_VAR) == (multinode.WORKERS_DIR, multinode.WORKER_PROCS_VAR)


def test_the_head_address_is_left_to_the_shell():
    assert shell_words(["x y", "--address={ray_head}", "{ray_head}"]) == (
        '\'x y\' --address="$LLMFLOW_RAY_HEAD" "$LLMFLOW_RAY_HEAD"'
    )


def test_a_rank_that_ended_fails_the_wait_with_its_node_and_log_tail(tmp_path: Path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "1.log").write_text("starting\nError: could not reach the head\n")
    result = _wait("127.0.0.1:9", f"0:headnode:{os.getpid()},1:node7:{gone.pid}", tmp_path)
    assert result.returncode == 1
    assert "Ray worker 1 on node node7 ended before the Ray cluster formed" in result.stderr
    assert "    Error: could not reach the head" in result.stderr


def test_the_ray_head_ending_is_named_as_such(tmp_path: Path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    result = _wait("127.0.0.1:9", f"0:headnode:{gone.pid}", tmp_path)
    assert "the Ray head (rank 0) on node headnode ended" in result.stderr and "(no log)" in result.stderr


def test_a_head_that_never_listens_fails_the_wait_after_the_timeout(tmp_path: Path):
    result = _wait("127.0.0.1:9", f"0:headnode:{os.getpid()}", tmp_path, timeout_s=1)
    assert result.returncode == 1
    assert "the Ray head does not listen on 127.0.0.1:9 after 1s (placement.worker_start_timeout_s)" in result.stderr


def test_the_helpers_print_what_the_script_reads():
    ports = subprocess.run([sys.executable, "-c", FREE_PORTS, "127.0.0.1"], capture_output=True, text=True, check=True)
    assert [p.isdigit() for p in ports.stdout.split()] == [True, True]
    ip = subprocess.run([sys.executable, "-c", RESOLVE, "localhost"], capture_output=True, text=True, check=True)
    assert ip.stdout.strip().startswith("127.")

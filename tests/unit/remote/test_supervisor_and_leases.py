"""The node-side supervisor, process-group teardown and leases, with real (trivial) processes.

The "server" here is Python's own http.server: what is under test is starting, finding the
port, and stopping, not the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmflow.placements import release_leftovers
from llmflow.remote.leases import all_leases, write_lease
from llmflow.remote.procs import group_alive, process_alive, stop_group
from llmflow.remote.start_script import SUPERVISOR as LAUNCHER


def _launch(tmp_path: Path, extra: list[str] | None = None, parent_cmd: list[str] | None = None):
    ep = tmp_path / "endpoint.json"
    cmd = [
        sys.executable,
        str(LAUNCHER),
        "--endpoint-file",
        str(ep),
        *(extra or []),
        "--",
        sys.executable,
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "{port}",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not ep.exists():
        assert time.monotonic() < deadline, "no endpoint record"
        time.sleep(0.05)
    return proc, json.loads(ep.read_text())


def _wait_until(cond, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_launcher_picks_a_port_and_stop_group_is_idempotent(tmp_path: Path):
    proc, ep = _launch(tmp_path)
    assert ep["pid"] == proc.pid and ep["port"] > 0
    assert _wait_until(lambda: _answers(ep["port"]))
    assert stop_group(proc.pid, grace_s=5) is True
    assert not group_alive(proc.pid)
    assert not process_alive(ep["server_pid"], None)
    assert stop_group(proc.pid) is False  # second call: nothing left, no error


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_server_stops_when_its_starter_is_killed(tmp_path: Path):
    """SIGKILL of the flow process skips every hook; the supervisor's parent watch still stops the server."""
    ep_file = tmp_path / "endpoint.json"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)",
            sys.executable,
            str(LAUNCHER),
            "--endpoint-file",
            str(ep_file),
            "--watch-parent",
            "--",
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert _wait_until(ep_file.exists)
    ep = json.loads(ep_file.read_text())
    assert _wait_until(lambda: _answers(ep["port"]))
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    assert _wait_until(lambda: not process_alive(ep["server_pid"], None) and not process_alive(ep["pid"], None))


def test_release_leftovers_only_takes_dead_owners(tmp_path: Path):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "orphan").mkdir(parents=True)
    live, _ = _launch(runs / "mine")
    orphan, _ = _launch(runs / "orphan")
    write_lease(runs / "mine", "mine", "local", live.pid, flow_run_id="f1")
    write_lease(runs / "orphan", "orphan", "local", orphan.pid, flow_run_id="f2")
    # make the orphan's owner a process that has exited
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease_file = runs / "orphan" / "lease.json"
    data = json.loads(lease_file.read_text())
    data.update(owner_pid=int(dead.stdout), owner_start=None)
    lease_file.write_text(json.dumps(data))
    try:
        released = release_leftovers(runs)
        assert [x.run_id for x in released] == ["orphan"]
        assert not group_alive(orphan.pid) and group_alive(live.pid)
        assert [lease.run_id for _, lease in all_leases(runs)] == ["mine"]
        # a hook releases its own flow run's servers even though the owner is alive
        assert [x.run_id for x in release_leftovers(runs, flow_run_id="f1")] == ["mine"]
        assert not group_alive(live.pid)
    finally:
        stop_group(live.pid, 2)
        stop_group(orphan.pid, 2)


def test_registry_record_and_the_node_address(tmp_path: Path):
    """``--host @node`` binds the address the node's name resolves to ({bind_host} in the command);
    the registry record follows the server: started, then stopped on SIGTERM."""
    registry = tmp_path / "registry" / "r0.json"
    registry.parent.mkdir()
    ep = tmp_path / "endpoint.json"
    cmd = [sys.executable, str(LAUNCHER), "--endpoint-file", str(ep), "--registry-file", str(registry)]
    cmd += ["--host", "@node", "--", sys.executable, "-m", "http.server", "--bind", "{bind_host}", "{port}"]
    env = {**os.environ, "SLURMD_NODENAME": "localhost", "SLURM_JOB_ID": "42"}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_until(registry.exists)
        record = json.loads(registry.read_text())
        assert (record["node"], record["host"], record["state"], record["job_id"]) == (
            "localhost",
            "127.0.0.1",
            "started",
            "42",
        )
        assert _wait_until(lambda: _answers_at(record["host"], record["port"]))
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
        assert json.loads(registry.read_text())["state"] == "stopped"
    finally:
        stop_group(proc.pid)


def _answers_at(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_dead_man_switch_stops_the_server_once_its_heartbeat_stops(tmp_path: Path):
    """Renewed, the server outlives several ttl periods; unrenewed, the supervisor stops it
    within the ttl plus one check, and says why in its registry record."""
    beat, registry = tmp_path / "heartbeat", tmp_path / "registry.json"
    ttl = 1.5
    proc, ep = _launch(
        tmp_path, ["--heartbeat-file", str(beat), "--lease-ttl", str(ttl), "--registry-file", str(registry)]
    )
    try:
        renewed_until = time.monotonic() + 3 * ttl
        n = 0
        while time.monotonic() < renewed_until:
            n += 1
            beat.write_text(str(n))  # only a change counts, never the file's time
            assert proc.poll() is None, "stopped although the heartbeat was renewed"
            time.sleep(ttl / 5)
        stopped_renewing = time.monotonic()
        proc.wait(timeout=ttl + 5)
        waited = time.monotonic() - stopped_renewing
        assert proc.returncode == 0
        assert ttl - 0.5 < waited < ttl + 1.5  # ttl, plus at most one check (ttl / 10 here)
        assert not process_alive(ep["server_pid"], None)
        assert json.loads(registry.read_text())["state"] == "expired"
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)


def test_dead_man_switch_counts_from_the_start_when_no_heartbeat_ever_came(tmp_path: Path):
    """A flow that died before its first renewal (or while the job was queued) still lets the server go."""
    proc, ep = _launch(tmp_path, ["--heartbeat-file", str(tmp_path / "never-written"), "--lease-ttl", "1"])
    try:
        proc.wait(timeout=6)
        assert not process_alive(ep["server_pid"], None)
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)


def test_an_expired_lease_also_removes_the_runs_secrets(tmp_path: Path):
    secrets_file = tmp_path / "secret_env"
    secrets_file.write_text("export A_TOKEN=x\n")
    proc, _ = _launch(
        tmp_path, ["--heartbeat-file", str(tmp_path / "hb"), "--lease-ttl", "1", "--secrets-file", str(secrets_file)]
    )
    try:
        proc.wait(timeout=6)
        assert not secrets_file.exists()
    finally:
        if proc.poll() is None:
            stop_group(proc.pid)

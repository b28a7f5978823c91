"""Supervisor that starts a model server on the node; standard library only.

It runs under the *server's* Python (the engine's own venv), so it must not import anything
from this project. It picks a free port on the node (never a fixed one), substitutes it for
``{port}`` in the server command, starts the server, and writes an endpoint record
``{"host", "node", "port", "pid", "server_pid", "restarts"}`` that the orchestrator reads back
(and, with ``--registry-file``, the same record plus a ``state`` into the run's registry folder,
where people and tools such as a load balancer find the replicas of a run). It then
stays as the server's parent so that:

* SIGTERM/SIGINT to the supervisor stops the server (SIGTERM, then SIGKILL after a grace);
* with ``--watch-parent``, if the process that started it dies (even by SIGKILL), the server
  is stopped too, so a killed flow never leaves a server behind.

The node is Slurm's name for it (``SLURMD_NODENAME``) inside a job, else the host name;
``--host @node`` binds the address that name resolves to (a node with several interfaces, or the
test cluster's nodes on their own loopback addresses); ``{bind_host}`` in the server command
becomes that address.

Usage: python supervisor.py --endpoint-file F [--registry-file R] [--host H|@node] [--watch-parent] -- CMD ... {port} ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10.0


def free_port(host: str) -> int:
    """Ask the kernel for a port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def stop(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint-file", required=True)
    parser.add_argument("--registry-file", help="also keep this replica's record, with its state, here")
    parser.add_argument("--host", default="127.0.0.1", help="interface the server binds; @node: the node's address")
    parser.add_argument("--watch-parent", action="store_true")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no server command given after --")

    node = node_name()
    host = socket.gethostbyname(node) if args.host == "@node" else args.host
    port = free_port(host)
    cmd = [part.replace("{port}", str(port)).replace("{bind_host}", host) for part in cmd]
    parent = os.getppid()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    record = {
        "host": host,
        "node": node,
        "port": port,
        "pid": os.getpid(),
        "server_pid": proc.pid,
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }

    def registry(state: str) -> None:
        if args.registry_file:
            try:
                write_atomic(args.registry_file, {**record, "state": state, "at": time.time()})
            except OSError as exc:  # the registry is for others to read; the server goes on without it
                print(f"[launcher] could not write {args.registry_file}: {exc}", flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        stop(proc)
        registry("stopped")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    write_atomic(args.endpoint_file, record)
    registry("started")
    print(f"[launcher] server pid {proc.pid} on {host}:{port} ({node})", flush=True)

    while True:
        code = proc.poll()
        if code is not None:
            print(f"[launcher] server exited with code {code}", flush=True)
            registry("exited")
            return code
        if args.watch_parent and os.getppid() != parent:
            print("[launcher] the process that started the server is gone; stopping it", flush=True)
            stop(proc)
            registry("stopped")
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())

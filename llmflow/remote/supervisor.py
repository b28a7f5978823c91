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
  is stopped too, so a killed flow never leaves a server behind;
* with ``--heartbeat-file F --lease-ttl S`` (a dead-man switch for servers the flow started
  over SSH: a Slurm job, an ssh host), the server is stopped and the supervisor exits, which
  ends the job, once F's content has not changed for S seconds. The flow rewrites F while its
  session lives; whatever ended the flow (a SIGKILL, a closed laptop, a network that went away),
  the renewals stop. Only changes are compared, on this node's own clock, so a skewed clock
  or a shared filesystem's timestamps cannot fire it early. ``--secrets-file`` (the engine's
  secrets) is removed then too, since no teardown will come to remove it.

The node is Slurm's name for it (``SLURMD_NODENAME``) inside a job, else the host name;
``--host @node`` binds the address that name resolves to (a node with several interfaces, or the
test cluster's nodes on their own loopback addresses); ``{bind_host}`` in the server command
becomes that address.

On the head of a multi-node job (``--workers-dir D --workers N --worker-procs rank:node:pid,...``)
it first waits for each worker's record ``D/<rank>.json`` and for its port to accept (a probe is
right at start-up, before the head holds the worker's one connection), puts their ``host:port``
list in for ``{workers}``, and then watches the workers' ``srun`` processes (its own children):
one that ends stops the server and the job, with that worker's node and log tail (``D/<rank>.log``).

Usage: python supervisor.py --endpoint-file F [--registry-file R] [--host H|@node] [--watch-parent]
       [--heartbeat-file F --lease-ttl S] [--workers-dir D --workers N --worker-procs P]
       -- CMD ... {port} ...
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
EXIT_LEASE_EXPIRED = 0  # the server did its job until nobody needed it: the Slurm job ends COMPLETED


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


class Heartbeat:
    """When the heartbeat file last changed, by this node's monotonic clock."""

    def __init__(self, path: str, ttl_s: float) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.last: bytes | None = self.read()
        self.changed_at = time.monotonic()  # the lease starts with the server, renewed or not

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read(256)
        except OSError:
            return None

    def expired(self) -> bool:
        now, content = time.monotonic(), self.read()
        if content != self.last:
            self.last, self.changed_at = content, now
        return now - self.changed_at > self.ttl_s


class WorkerGone(Exception):
    """A worker of a multi-node job ended (or never came up); the message names its node."""


class Workers:
    """The workers of a multi-node job, watched through their ``srun`` processes on this node."""

    def __init__(self, folder: str, count: int, procs: str) -> None:
        self.folder = folder
        self.count = count
        self.procs: dict[int, tuple[str, int]] = {}  # rank -> (node, srun pid)
        for item in filter(None, procs.split(",")):
            rank, node, pid = item.split(":")
            self.procs[int(rank)] = (node, int(pid))
        self.records: list[dict] = []

    def log_tail(self, rank: int, lines: int = 10) -> str:
        try:
            with open(f"{self.folder}/{rank}.log", errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in tail) or "    (empty log)"

    def check(self) -> None:
        """Raise ``WorkerGone`` for the first worker whose ``srun`` has ended."""
        for rank, (node, pid) in sorted(self.procs.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
                how = f"srun exit code {os.waitstatus_to_exitcode(status)}" if done else ""
            except ChildProcessError:  # reaped before the exec made it ours: see if it still exists
                try:
                    os.kill(pid, 0)
                    continue
                except ProcessLookupError:
                    done, how = pid, "its srun is gone"
            if done:
                who = "the Ray head (rank 0)" if rank == 0 else f"worker {rank}"  # rank 0: vLLM's Ray head
                raise WorkerGone(
                    f"{who} on node {node} ended ({how}); the model cannot be served "
                    f"without it. Its log ({self.folder}/{rank}.log), last lines:\n{self.log_tail(rank)}"
                )

    def wait_ready(self, timeout_s: float) -> list[dict]:
        """Each worker's record, once its port accepts a connection (rank order)."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(1, self.count + 1))
        records: dict[int, dict] = {}
        while pending:
            self.check()
            for rank in sorted(pending):
                try:
                    with open(f"{self.folder}/{rank}.json") as f:
                        record = json.load(f)
                    with socket.create_connection((record["host"], int(record["port"])), timeout=2):
                        pass
                except (OSError, ValueError, KeyError):
                    continue
                records[rank] = {"rank": rank, **record}
                pending.discard(rank)
                print(
                    f"[launcher] worker {rank} listens on {record['host']}:{record['port']} ({record['node']})",
                    flush=True,
                )
            if pending and time.monotonic() > deadline:
                ranks = ", ".join(f"{r} on {self.procs.get(r, ('?', 0))[0]}" for r in sorted(pending))
                raise WorkerGone(f"worker(s) {ranks} not listening after {timeout_s:.0f}s")
            if pending:
                time.sleep(0.5)
        self.records = [records[r] for r in sorted(records)]
        return self.records

    def stop(self, wait_s: float = 3.0) -> None:
        """SIGTERM to every worker's srun (Slurm ends the steps with the job anyway), and wait a
        little for them, so that their last words are in the job's log before ours."""
        for _node, pid in self.procs.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for _node, pid in self.procs.values():
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)


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
    parser.add_argument("--heartbeat-file", help="stop the server once this file stops changing (needs --lease-ttl)")
    parser.add_argument("--lease-ttl", type=float, default=600.0, help="seconds without a heartbeat before stopping")
    parser.add_argument("--secrets-file", help="removed when the lease expires (nobody will tear the run down)")
    parser.add_argument("--workers-dir", help="multi-node head: the workers' records and logs")
    parser.add_argument("--workers", type=int, default=0, help="multi-node head: how many workers to wait for")
    parser.add_argument("--workers-timeout", type=float, default=300.0, help="seconds to wait for them to listen")
    parser.add_argument("--worker-procs", default="", help="rank:node:pid of each worker's srun, comma-separated")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no server command given after --")

    node = node_name()
    host = socket.gethostbyname(node) if args.host == "@node" else args.host
    port = free_port(host)
    cmd = [part.replace("{port}", str(port)).replace("{bind_host}", host) for part in cmd]
    workers = Workers(args.workers_dir, args.workers, args.worker_procs) if args.workers_dir else None
    if workers is not None:
        try:
            ready = workers.wait_ready(args.workers_timeout)
        except WorkerGone as exc:
            workers.stop()
            print(f"[launcher] {exc}", file=sys.stderr, flush=True)
            return 1
        listing = ",".join(f"{w['host']}:{w['port']}" for w in ready)
        cmd = [part.replace("{workers}", listing) for part in cmd]
    parent = os.getppid()
    heartbeat = Heartbeat(args.heartbeat_file, args.lease_ttl) if args.heartbeat_file else None
    check_every = min(10.0, max(0.5, args.lease_ttl / 10))
    next_check = time.monotonic() + check_every
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
    if workers is not None:
        record["workers"] = [
            {k: w.get(k) for k in ("rank", "node", "host", "port", "pid", "server_pid")} for w in workers.records
        ]

    def registry(state: str) -> None:
        if args.registry_file:
            try:
                write_atomic(args.registry_file, {**record, "state": state, "at": time.time()})
            except OSError as exc:  # the registry is for others to read; the server goes on without it
                print(f"[launcher] could not write {args.registry_file}: {exc}", flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        stop(proc)
        if workers is not None:
            workers.stop()
        registry("stopped")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    write_atomic(args.endpoint_file, record)
    registry("started")
    print(f"[launcher] server pid {proc.pid} on {host}:{port} ({node})", flush=True)

    while True:
        code = proc.poll()
        if workers is not None:
            try:
                if code is not None:
                    registry("stopping")
                    time.sleep(1.0)  # a worker's death often takes the head down: name the worker if so
                workers.check()
            except WorkerGone as exc:
                registry("stopping")  # at once: the orchestrator may be asking whether the server is gone
                stop(proc)
                workers.stop()
                print(f"[launcher] {exc}", file=sys.stderr, flush=True)  # last, so the log's tail shows it
                registry("worker-gone")
                return 1
        if code is not None:
            print(f"[launcher] server exited with code {code} on node {node}", flush=True)
            if workers is not None:
                workers.stop()
            registry("exited")
            return code
        if args.watch_parent and os.getppid() != parent:
            print("[launcher] the process that started the server is gone; stopping it", flush=True)
            stop(proc)
            if workers is not None:
                workers.stop()
            registry("stopped")
            return 1
        if heartbeat is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + check_every
            if heartbeat.expired():
                print(
                    f"[launcher] no heartbeat from the flow for {args.lease_ttl:.0f}s "
                    "(the flow that started the server is gone); stopping the server",
                    flush=True,
                )
                stop(proc)
                if workers is not None:
                    workers.stop()
                if args.secrets_file:
                    try:
                        os.unlink(args.secrets_file)
                    except FileNotFoundError:
                        pass
                registry("expired")
                return EXIT_LEASE_EXPIRED
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())

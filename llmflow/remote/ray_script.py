"""The body of a K-node job that serves one model with vLLM over Ray, as text (``style: ray``).

Pure, like ``multinode``: the same preamble, then what vLLM documents for multi-node serving
(a Ray head, a Ray worker on each other node, the server started on the head once the cluster
has every node), laid out the way ``multinode`` lays out rpc workers, so that a dead node fails
the job the same way:

* rank 0, the Ray head, runs in the batch script's background (``ray start --head --block``,
  its log ``workers/0.log``); ranks 1..K-1 are ``ray start --address=<head> --block`` by ``srun``
  under the supervisor, which resolves the node's address (``{bind_host}``) and writes each
  worker's record ``workers/N.json`` (node, address, the raylet's port), so the endpoint record
  names every node. ``--block`` keeps each Ray node a child that stops its Ray processes on
  SIGTERM (and Ray ties them to it: they die with it), never a daemon that outlives the job.
* the script waits until Ray counts K live nodes (``placement.worker_start_timeout_s``); a rank
  whose process ends first fails the job at once with its node and log tail.
* the head's supervisor (``exec``) starts vLLM with ``RAY_ADDRESS`` set, and watches rank 0
  and every worker's ``srun`` (``--worker-procs``): one that ends stops the server and fails the
  job naming that node, with its log tail.

Ports are picked free at run time, never fixed: two jobs may share a node (or, on the test
cluster, a machine), and Ray's defaults (6379 for the head, 10001 for its client server) would
collide. Until the ``exec``, an EXIT trap stops what the script started; after it the supervisor
owns those processes, and Slurm ends whatever is left with the job.
"""

from __future__ import annotations

import shlex

from llmflow.engines.base import MultiNodeLaunch
from llmflow.remote.start_script import preamble_lines, supervisor_argv

# as in ``multinode`` (which imports this module, so not imported from there): the ranks' records
# and logs in the run folder, and the rank:node:pid list the head's supervisor watches
WORKERS_DIR = "workers"
WORKER_PROCS_VAR = "LLMFLOW_WORKER_PROCS"
RAY_HEAD_PLACEHOLDER = "{ray_head}"  # in a worker's argv: the head's ip:port, known once the job runs
RAY_HEAD_VAR = "LLMFLOW_RAY_HEAD"
RAY_IP_VAR = "LLMFLOW_RAY_IP"
PIDS_VAR = "LLMFLOW_RAY_PIDS"  # the head's Ray and each worker's srun, for the EXIT trap
WAIT_DELIMITER = "LLMFLOW_RAY_WAIT"
# vLLM takes each node's address from VLLM_HOST_IP (else it guesses one); Ray's actors inherit the
# environment of their node's `ray start`, so each node's Ray is started with its own address there
HOST_IP_ENV = "VLLM_HOST_IP"
# no usage reports to a server nothing can reach, and no 30 s drain before a Ray node stops
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
WILDCARDS = ("0.0.0.0", "::", "@node")  # bind hosts that say nothing of the address Ray should use

# Runs under the server's Python on the head: the Ray cluster is ready once it has every node. A
# rank that ends first fails at once (its log tail, its node); so does running out of time.
WAIT_FOR_NODES = """\
import os, socket, sys, time

address, want, timeout_s, procs, folder = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
deadline = time.monotonic() + timeout_s


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(ready, what):
    while not ready():
        for item in filter(None, procs.split(",")):
            rank, node, pid = item.split(":")
            if not alive(int(pid)):
                try:
                    with open(f"{folder}/{rank}.log", errors="replace") as f:
                        tail = "\\n".join("    " + line for line in f.read().splitlines()[-15:])
                except OSError:
                    tail = "    (no log)"
                who = "the Ray head (rank 0)" if rank == "0" else f"Ray worker {rank}"
                sys.exit(f"[llmflow] {who} on node {node} ended before the Ray cluster formed; "
                         f"its log ({folder}/{rank}.log), last lines:\\n{tail}")
        if time.monotonic() > deadline:
            sys.exit(f"[llmflow] {what()} after {timeout_s:g}s (placement.worker_start_timeout_s)")
        time.sleep(1)


def head_listens():
    try:
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


wait(head_listens, lambda: f"the Ray head does not listen on {address}")
import ray

ray.init(address=address, _node_ip_address=address.rsplit(":", 1)[0], logging_level="ERROR", log_to_driver=False)
nodes = lambda: sum(1 for n in ray.nodes() if n["Alive"])
wait(lambda: nodes() >= want, lambda: f"only {nodes()} of {want} nodes joined the Ray cluster at {address}")
print(f"[llmflow] the Ray cluster at {address} has its {want} nodes", flush=True)
ray.shutdown()"""

# two ports free on the head's address now (the head's, its client server's)
FREE_PORTS = (
    "import socket, sys\n"
    "socks = [socket.socket() for _ in range(2)]\n"
    "[s.bind((sys.argv[1], 0)) for s in socks]\n"
    "print(*(s.getsockname()[1] for s in socks))"
)
RESOLVE = "import socket, sys; print(socket.gethostbyname(sys.argv[1]))"  # as the supervisor's @node


def ray_cli(server_python: str) -> list[str]:
    """Ray's command line from the server's venv (its ``bin/ray`` is this, by another path)."""
    return [server_python, "-m", "ray.scripts.scripts"]


def ray_worker_argv(server_python: str) -> list[str]:
    """A Ray worker node under the supervisor: it fills ``{bind_host}`` (the node's address) and
    ``{port}`` (the raylet's, so the head's supervisor can probe it); the job script fills
    ``{ray_head}``."""
    return [
        "env",
        f"{HOST_IP_ENV}={{bind_host}}",
        *ray_cli(server_python),
        "start",
        f"--address={RAY_HEAD_PLACEHOLDER}",
        "--node-ip-address={bind_host}",
        "--node-manager-port={port}",
        "--block",
    ]


def shell_words(argv: list[str]) -> str:
    """``shlex.join``, but ``{ray_head}`` becomes ``"$LLMFLOW_RAY_HEAD"`` (expanded by the shell)."""
    return " ".join(
        f'"${RAY_HEAD_VAR}"'.join(shlex.quote(part) if part else "" for part in arg.split(RAY_HEAD_PLACEHOLDER))
        if RAY_HEAD_PLACEHOLDER in arg
        else shlex.quote(arg)
        for arg in argv
    )


def head_address_lines(server_python: str, bind_host: str) -> list[str]:
    """The head's Ray address: its node's (as workers take theirs) unless ``bind_host`` names one,
    and two ports free on it."""
    py = shlex.quote(server_python)
    ip = f'"$({py} -c {shlex.quote(RESOLVE)} "$SLURMD_NODENAME")"' if bind_host in WILDCARDS else shlex.quote(bind_host)
    return [
        f"{RAY_IP_VAR}={ip}",
        f'read -r LLMFLOW_RAY_PORT LLMFLOW_RAY_CLIENT_PORT < <({py} -c {shlex.quote(FREE_PORTS)} "${RAY_IP_VAR}")',
        f'{RAY_HEAD_VAR}="${RAY_IP_VAR}:$LLMFLOW_RAY_PORT"',
    ]


def ray_start_lines(
    *,
    run_dir: str,
    setup: list[str],
    server_python: str,
    launch: MultiNodeLaunch,
    nodes: int,
    bind_host: str,
    launcher_source: str,
    api_key_env: str | None,
    registry_file: str | None = None,
    lease_ttl_s: float | None = None,
    worker_timeout_s: float = 300.0,
) -> list[str]:
    """Body lines of a K-node vLLM job (after its ``#SBATCH`` header): Ray head here, a Ray worker
    on each other node, then the head's supervisor starts ``launch.head`` (the server)."""
    q = shlex.quote
    workers = f"{run_dir}/{WORKERS_DIR}"
    procs = f"${WORKER_PROCS_VAR}"
    preamble = preamble_lines(
        run_dir=run_dir,
        setup=setup,
        launcher_source=launcher_source,
        api_key_env=api_key_env,
        registry_file=registry_file,
    )
    ray_head = [
        shlex.join([*ray_cli(server_python), "start", "--head"]),
        f'--node-ip-address="${RAY_IP_VAR}"',
        '--port="$LLMFLOW_RAY_PORT"',
        '--ray-client-server-port="$LLMFLOW_RAY_CLIENT_PORT"',
        "--include-dashboard=false",
        "--block",
    ]
    worker_cmd = shlex.join([server_python, f"{run_dir}/supervisor.py"])
    worker_cmd += f' --endpoint-file {q(workers)}/"$RANK".json --host @node'  # $RANK: expanded
    head = supervisor_argv(
        run_dir=run_dir,
        server_python=server_python,
        bind_host=bind_host,
        registry_file=registry_file,
        lease_ttl_s=lease_ttl_s,
    )
    head += ["--workers-dir", workers, "--workers", str(nodes - 1), "--workers-timeout", f"{worker_timeout_s:g}"]
    return [
        *preamble,
        "# --- Ray: its head on this node (rank 0), a Ray worker on each other node (ranks 1..K-1) ---",
        'mapfile -t LLMFLOW_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'if [ "${{#LLMFLOW_NODES[@]}}" -ne {nodes} ]; then',
        f'  echo "[llmflow] this job has ${{#LLMFLOW_NODES[@]}} nodes, not the {nodes} it asked for" >&2; exit 1',
        "fi",
        f"rm -rf {q(workers)} && mkdir -p {q(workers)}",
        f"export {' '.join(f'{k}={v}' for k, v in RAY_ENV.items())}",
        *head_address_lines(server_python, bind_host),
        f"trap 'kill ${PIDS_VAR} 2>/dev/null' EXIT  # what this script started, until the exec below",
        f'{HOST_IP_ENV}="${RAY_IP_VAR}" {" ".join(ray_head)} > {q(workers)}/0.log 2>&1 &',
        f'{PIDS_VAR}=$! {WORKER_PROCS_VAR}="0:$SLURMD_NODENAME:$!"',
        "RANK=0",
        'for NODE in "${LLMFLOW_NODES[@]}"; do',
        '  [ "$NODE" = "$SLURMD_NODENAME" ] && continue  # the head',
        "  RANK=$((RANK + 1))",
        f'  srun --nodes=1 --ntasks=1 --nodelist="$NODE" --overlap --output={q(workers)}/"$RANK".log \\',
        f"    {worker_cmd} -- {shell_words(launch.worker_argv)} &",
        f'  {PIDS_VAR}="${PIDS_VAR} $!" {WORKER_PROCS_VAR}="{procs},$RANK:$NODE:$!"',
        "done",
        f"# --- wait until Ray counts the {nodes} nodes (a rank that ends first fails the job, naming it) ---",
        f'{q(server_python)} - "${RAY_HEAD_VAR}" {nodes} {worker_timeout_s:g} "{procs}" {q(workers)} '
        f"<<'{WAIT_DELIMITER}'",
        WAIT_FOR_NODES,
        WAIT_DELIMITER,
        "# --- the head: vLLM on this Ray cluster, under the supervisor that watches every rank ---",
        f'export RAY_ADDRESS="${RAY_HEAD_VAR}" {HOST_IP_ENV}="${RAY_IP_VAR}"',
        f'exec {shlex.join(head)} --worker-procs "{procs}" -- {shlex.join(launch.head.argv)}',
    ]

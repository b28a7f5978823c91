"""The body of a job that serves one model over K nodes, as text (``placement.nodes`` > 1).

Pure, like ``start_script``: the same preamble (key, secrets, setup lines, the supervisor's
source), then each other node of the job gets a worker under the supervisor, started with
``srun`` from the head's batch script, and the head's supervisor starts the server.

Each worker is watched by its ``srun`` process on the head node, not by probing its port:
llama.cpp's rpc-server holds the head's one connection and stops accepting others, so a TCP
probe reports a healthy worker as dead (seed 004's lesson). The head's supervisor owns those
``srun`` processes (the script ``exec``s it), so it sees one end at once, and fails the job
naming the worker's node, with its log tail. Worker ``N`` writes ``workers/N.json`` (its
endpoint) and ``workers/N.log`` in the run folder, which the nodes share.
"""

from __future__ import annotations

import shlex

from llmflow.engines.base import MultiNodeLaunch
from llmflow.remote.start_script import preamble_lines, supervisor_argv

WORKERS_DIR = "workers"  # in the run folder: N.json (endpoint record) and N.log of worker rank N
WORKER_PROCS_VAR = "LLMFLOW_WORKER_PROCS"  # rank:node:pid of each worker's srun, comma-separated


def worker_launch_lines(*, run_dir: str, server_python: str, worker_argv: list[str], nodes: int) -> list[str]:
    """Start a worker on every node of the job but this one (ranks 1..K-1), each by ``srun``.

    The node list comes from Slurm at run time (a requeued job may land elsewhere), checked
    against the K the job asked for."""
    q = shlex.quote
    workers = f"{run_dir}/{WORKERS_DIR}"
    supervisor = shlex.join([server_python, f"{run_dir}/supervisor.py"])
    worker_cmd = f'{supervisor} --endpoint-file {q(workers)}/"$RANK".json --host @node'  # $RANK: expanded
    return [
        "# --- workers: one per node of the job but this one ---",
        'mapfile -t LLMFLOW_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'if [ "${{#LLMFLOW_NODES[@]}}" -ne {nodes} ]; then',
        f'  echo "[llmflow] this job has ${{#LLMFLOW_NODES[@]}} nodes, not the {nodes} it asked for" >&2; exit 1',
        "fi",
        f"rm -rf {q(workers)} && mkdir -p {q(workers)}",
        f"{WORKER_PROCS_VAR}=''",
        "RANK=0",
        'for NODE in "${LLMFLOW_NODES[@]}"; do',
        '  [ "$NODE" = "$SLURMD_NODENAME" ] && continue  # the head',
        "  RANK=$((RANK + 1))",
        f'  srun --nodes=1 --ntasks=1 --nodelist="$NODE" --overlap --output={q(workers)}/"$RANK".log \\',
        f"    {worker_cmd} -- {shlex.join(worker_argv)} &",
        f'  {WORKER_PROCS_VAR}="${{{WORKER_PROCS_VAR}:+${WORKER_PROCS_VAR},}}$RANK:$NODE:$!"',
        "done",
    ]


def multinode_start_lines(
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
    """Body lines of a K-node job (after its ``#SBATCH`` header); ``launch.style`` picks how
    the head and workers meet."""
    if launch.style == "ray":
        from llmflow.remote.ray_script import ray_start_lines  # vLLM over Ray

        return ray_start_lines(
            run_dir=run_dir,
            setup=setup,
            server_python=server_python,
            launch=launch,
            nodes=nodes,
            bind_host=bind_host,
            launcher_source=launcher_source,
            api_key_env=api_key_env,
            registry_file=registry_file,
            lease_ttl_s=lease_ttl_s,
            worker_timeout_s=worker_timeout_s,
        )
    preamble = preamble_lines(
        run_dir=run_dir,
        setup=setup,
        launcher_source=launcher_source,
        api_key_env=api_key_env,
        registry_file=registry_file,
    )
    workers = worker_launch_lines(
        run_dir=run_dir, server_python=server_python, worker_argv=launch.worker_argv, nodes=nodes
    )
    head = supervisor_argv(
        run_dir=run_dir,
        server_python=server_python,
        bind_host=bind_host,
        registry_file=registry_file,
        lease_ttl_s=lease_ttl_s,
    )
    head += [
        "--workers-dir",
        f"{run_dir}/{WORKERS_DIR}",
        "--workers",
        str(nodes - 1),
        "--workers-timeout",
        f"{worker_timeout_s:g}",
    ]
    return [
        *preamble,
        *workers,
        "# --- the head: waits for every worker to listen, then serves with them ---",
        f'exec {shlex.join(head)} --worker-procs "${WORKER_PROCS_VAR}" -- {shlex.join(launch.head.argv)}',
    ]

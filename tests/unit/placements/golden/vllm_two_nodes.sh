#!/bin/bash
#SBATCH --job-name=llmflow-r1
#SBATCH --output=/scratch/u/llmflow-runs/r1/slurm-%j.out
#SBATCH --error=/scratch/u/llmflow-runs/r1/slurm-%j.out
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --time=01:00:00
#SBATCH --requeue
set -eo pipefail
cd /scratch/u/llmflow-runs/r1
rm -f endpoint.json  # a restarted (requeued) server writes a fresh one
mkdir -p /scratch/u/llmflow-runs/registry
if [ -f api_key ]; then VLLM_API_KEY="$(cat api_key)"; export VLLM_API_KEY; fi
if [ -f secret_env ]; then set -a; . ./secret_env; set +a; fi  # engine.secret_env (0600)
cd ~  # setup lines, engine and model paths: relative ones are taken from the home folder
# --- setup lines from the engine config ---
module load cuda/12.4
export HF_HOME=/scratch/u/hf
# --- end of setup lines ---
cat > /scratch/u/llmflow-runs/r1/supervisor.py <<'LLMFLOW_NODE_LAUNCHER'
print('the supervisor source goes here')
LLMFLOW_NODE_LAUNCHER
# --- Ray: its head on this node (rank 0), a Ray worker on each other node (ranks 1..K-1) ---
mapfile -t LLMFLOW_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#LLMFLOW_NODES[@]}" -ne 2 ]; then
  echo "[llmflow] this job has ${#LLMFLOW_NODES[@]} nodes, not the 2 it asked for" >&2; exit 1
fi
rm -rf /scratch/u/llmflow-runs/r1/workers && mkdir -p /scratch/u/llmflow-runs/r1/workers
export RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
LLMFLOW_RAY_IP="$(/scratch/u/venvs/vllm/bin/python -c 'import socket, sys; print(socket.gethostbyname(sys.argv[1]))' "$SLURMD_NODENAME")"
read -r LLMFLOW_RAY_PORT LLMFLOW_RAY_CLIENT_PORT < <(/scratch/u/venvs/vllm/bin/python -c 'import socket, sys
socks = [socket.socket() for _ in range(2)]
[s.bind((sys.argv[1], 0)) for s in socks]
print(*(s.getsockname()[1] for s in socks))' "$LLMFLOW_RAY_IP")
LLMFLOW_RAY_HEAD="$LLMFLOW_RAY_IP:$LLMFLOW_RAY_PORT"
trap 'kill $LLMFLOW_RAY_PIDS 2>/dev/null' EXIT  # what this script started, until the exec below
VLLM_HOST_IP="$LLMFLOW_RAY_IP" /scratch/u/venvs/vllm/bin/python -m ray.scripts.scripts start --head --node-ip-address="$LLMFLOW_RAY_IP" --port="$LLMFLOW_RAY_PORT" --ray-client-server-port="$LLMFLOW_RAY_CLIENT_PORT" --include-dashboard=false --block > /scratch/u/llmflow-runs/r1/workers/0.log 2>&1 &
LLMFLOW_RAY_PIDS=$! LLMFLOW_WORKER_PROCS="0:$SLURMD_NODENAME:$!"
RANK=0
for NODE in "${LLMFLOW_NODES[@]}"; do
  [ "$NODE" = "$SLURMD_NODENAME" ] && continue  # the head
  RANK=$((RANK + 1))
  srun --nodes=1 --ntasks=1 --nodelist="$NODE" --overlap --output=/scratch/u/llmflow-runs/r1/workers/"$RANK".log \
    /scratch/u/venvs/vllm/bin/python /scratch/u/llmflow-runs/r1/supervisor.py --endpoint-file /scratch/u/llmflow-runs/r1/workers/"$RANK".json --host @node -- env 'VLLM_HOST_IP={bind_host}' /scratch/u/venvs/vllm/bin/python -m ray.scripts.scripts start --address="$LLMFLOW_RAY_HEAD" '--node-ip-address={bind_host}' '--node-manager-port={port}' --block &
  LLMFLOW_RAY_PIDS="$LLMFLOW_RAY_PIDS $!" LLMFLOW_WORKER_PROCS="$LLMFLOW_WORKER_PROCS,$RANK:$NODE:$!"
done
# --- wait until Ray counts the 2 nodes (a rank that ends first fails the job, naming it) ---
/scratch/u/venvs/vllm/bin/python - "$LLMFLOW_RAY_HEAD" 2 120 "$LLMFLOW_WORKER_PROCS" /scratch/u/llmflow-runs/r1/workers <<'LLMFLOW_RAY_WAIT'
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
                        tail = "\n".join("    " + line for line in f.read().splitlines()[-15:])
                except OSError:
                    tail = "    (no log)"
                who = "the Ray head (rank 0)" if rank == "0" else f"Ray worker {rank}"
                sys.exit(f"[llmflow] {who} on node {node} ended before the Ray cluster formed; "
                         f"its log ({folder}/{rank}.log), last lines:\n{tail}")
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
ray.shutdown()
LLMFLOW_RAY_WAIT
# --- the head: vLLM on this Ray cluster, under the supervisor that watches every rank ---
export RAY_ADDRESS="$LLMFLOW_RAY_HEAD" VLLM_HOST_IP="$LLMFLOW_RAY_IP"
exec /scratch/u/venvs/vllm/bin/python /scratch/u/llmflow-runs/r1/supervisor.py --endpoint-file /scratch/u/llmflow-runs/r1/endpoint.json --registry-file /scratch/u/llmflow-runs/registry/r1.json --heartbeat-file /scratch/u/llmflow-runs/r1/heartbeat --lease-ttl 600 --secrets-file /scratch/u/llmflow-runs/r1/secret_env --host @node --workers-dir /scratch/u/llmflow-runs/r1/workers --workers 1 --workers-timeout 120 --worker-procs "$LLMFLOW_WORKER_PROCS" -- /scratch/u/venvs/vllm/bin/python -m vllm.entrypoints.openai.api_server --model /scratch/u/models/llama-70b --served-model-name llama --host '{bind_host}' --port '{port}' --tensor-parallel-size 1 --pipeline-parallel-size 2 --distributed-executor-backend ray

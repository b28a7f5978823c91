"""A model over several nodes: the job script (rendered, then checked by bash) and the head's
supervisor waiting for and watching its workers, with real (trivial) processes standing in for
``srun`` and ``rpc-server``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmflow import engines
from llmflow.config import LlamaCppEngine, LlamaServerEngine, ModelConfig, SessionConfig, SlurmOptions
from llmflow.errors import ConfigError
from llmflow.placements import slurm_jobs
from llmflow.remote.start_script import SUPERVISOR

MODEL = ModelConfig(path=Path("/models/m.gguf"), served_name="m")


def _script(nodes: int = 3, **engine) -> str:
    spec = engines.spec_for(LlamaServerEngine(binary=Path("/opt/llama-server"), rpc_binary=Path("/opt/rpc"), **engine))
    return slurm_jobs.render_job_script(
        opts=SlurmOptions(partition="gpu"),
        job_name="llmflow-r1",
        run_dir="/scratch/runs/r1",
        setup=["module load cuda"],
        server_python="python3",
        server_argv=[],
        bind_host="@node",
        launcher_source="print('supervisor')",
        multinode=spec.launch_multinode(MODEL, "{bind_host}", None, nodes),
        nodes=nodes,
        worker_timeout_s=120,
    )


def test_rpc_job_script_asks_for_k_nodes_starts_k_minus_1_workers_then_the_head(tmp_path: Path):
    script = _script(tensor_split=[26, 27], mlock=True, cache_type_k="q4_0", batch_size=512, ubatch_size=512)
    assert "#SBATCH --nodes=3\n#SBATCH --ntasks-per-node=1\n" in script
    srun = next(line for line in script.splitlines() if line.lstrip().startswith("srun "))
    assert '--nodelist="$NODE"' in srun and '--output=/scratch/runs/r1/workers/"$RANK".log' in srun
    worker = next(line for line in script.splitlines() if "/opt/rpc" in line)
    assert (
        "--endpoint-file /scratch/runs/r1/workers/\"$RANK\".json --host @node -- /opt/rpc --host '{bind_host}'"
        in worker
    )
    head = script.splitlines()[-1]
    assert head.startswith("exec python3 /scratch/runs/r1/supervisor.py ")
    assert "--workers-dir /scratch/runs/r1/workers --workers 2 --workers-timeout 120" in head
    assert '--worker-procs "$LLMFLOW_WORKER_PROCS"' in head
    server = head.split(" -- ", 1)[1].split()
    pairs = {flag: server[i + 1] for i, flag in enumerate(server[:-1]) if flag.startswith("--")}
    assert pairs["--rpc"] == "'{workers}'" and pairs["--n-gpu-layers"] == "999"
    assert (pairs["--tensor-split"], pairs["--cache-type-k"], pairs["--batch-size"]) == ("26,27", "q4_0", "512")
    assert "--mlock" in server
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_multi_node_settings_that_cannot_work_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"engine.tensor_split: 3 shares for 2 rpc-server workers"):
        _script(tensor_split=[1, 1, 1])
    with pytest.raises(ConfigError, match="engine.router: router mode serves on one node"):
        _script(router={"models_max": 2})
    with pytest.raises(ConfigError, match=r"placement.nodes: 2 nodes for one model .* 'llama_cpp' serves on one node"):
        engines.spec_for(LlamaCppEngine()).launch_multinode(MODEL, "h", None, 2)
    config = SessionConfig.model_validate(
        {"placement": {"kind": "slurm", "nodes": 2}, "engine": {"kind": "llama_server"}}
    )
    assert config.placement.nodes == 2


# A stand-in worker: writes its record, listens (the head's start-up probe), and lives `life` seconds.
FAKE_WORKER = """
import json, socket, sys, time
folder, rank, life = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
json.dump({"host": "127.0.0.1", "port": s.getsockname()[1], "node": "node9", "pid": 0, "server_pid": 0},
          open(f"{folder}/{rank}.json", "w"))
print("worker up", flush=True)
time.sleep(life)
print("worker going away", flush=True)
sys.exit(3)
"""


def _head(tmp_path: Path, worker_life_s: float) -> subprocess.Popen:
    """bash starts one worker in the background (as the job script starts srun) and execs the head."""
    workers = tmp_path / "workers"
    workers.mkdir()
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    server = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
    head = [sys.executable, str(SUPERVISOR), "--endpoint-file", str(tmp_path / "endpoint.json")]
    head += ["--workers-dir", str(workers), "--workers", "1", "--workers-timeout", "20"]
    script = (
        f"{sys.executable} {tmp_path / 'worker.py'} {workers} 1 {worker_life_s} > {workers}/1.log 2>&1 &\n"
        f'exec {" ".join(head)} --worker-procs "1:node9:$!" -- {" ".join(server)}\n'
    )
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_head_serves_once_its_worker_listens_and_stops_when_the_worker_ends(tmp_path: Path):
    proc = _head(tmp_path, worker_life_s=4)
    started = time.monotonic()
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    output = proc.stdout.read()
    endpoint = json.loads((tmp_path / "endpoint.json").read_text())
    assert [(w["rank"], w["node"]) for w in endpoint["workers"]] == [(1, "node9")]
    assert code == 1 and time.monotonic() - started < 15
    assert "worker 1 on node node9 ended (srun exit code 3)" in output
    assert output.rstrip().endswith("worker going away"), output  # the worker's log tail, last
    assert output.index("worker 1 listens on") < output.index("server pid")  # the server waited for it


def test_a_worker_that_ends_before_listening_fails_the_head_without_a_server(tmp_path: Path):
    (tmp_path / "workers").mkdir()
    head = [sys.executable, str(SUPERVISOR), "--endpoint-file", str(tmp_path / "endpoint.json")]
    head += ["--workers-dir", str(tmp_path / "workers"), "--workers", "1"]
    script = f'sh -c "sleep 0.5; exit 1" &\nexec {" ".join(head)} --worker-procs "1:node7:$!" -- {sys.executable} -m http.server {{port}}\n'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "worker 1 on node node7 ended (srun exit code 1)" in proc.stderr
    assert not (tmp_path / "endpoint.json").exists()

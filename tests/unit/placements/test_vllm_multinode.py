"""vLLM over Ray on the K nodes of one Slurm job (``remote.ray_script``): the whole job script is
pinned by a golden file, and it must parse (``bash -n``). Regenerate the golden file after a
deliberate change with ``LLMFLOW_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/placements/test_vllm_multinode.py``
and read its diff."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llmflow import engines
from llmflow.config import ModelConfig, SessionConfig, SlurmOptions, SlurmPlacement, VllmEngine
from llmflow.errors import ConfigError
from llmflow.placements import slurm_jobs
from llmflow.placements.slurm import SlurmDriver
from llmflow.remote.ray_script import RAY_HEAD_PLACEHOLDER

GOLDEN = Path(__file__).parent / "golden" / "vllm_two_nodes.sh"
RUN_DIR = "/scratch/u/llmflow-runs/r1"
SHORT_LAUNCHER = "print('the supervisor source goes here')"  # the real one is pinned elsewhere


def _session(nodes: int = 2, **engine) -> SessionConfig:
    return SessionConfig(
        placement=SlurmPlacement(
            slurm=SlurmOptions(partition="gpu", gres="gpu:1", time="01:00:00"),
            remote_runs_dir="/scratch/u/llmflow-runs",
            bind_host="@node",
            nodes=nodes,
            worker_start_timeout_s=120,
        ),
        engine=VllmEngine(
            venv=Path("/scratch/u/venvs/vllm"),
            setup=["module load cuda/12.4", "export HF_HOME=/scratch/u/hf"],
            **{"tensor_parallel_size": 1, "pipeline_parallel_size": 2, **engine},
        ),
        model=ModelConfig(path=Path("/scratch/u/models/llama-70b"), served_name="llama"),
    )


def render(config: SessionConfig) -> str:
    """The job script as ``SlurmDriver.allocate`` writes it, with a short supervisor source."""
    driver = SlurmDriver(config)
    args = {**driver.start_args(RUN_DIR), "launcher_source": SHORT_LAUNCHER}
    return slurm_jobs.render_job_script(
        opts=config.placement.slurm, job_name="llmflow-r1", **args, **driver.multinode_args()
    )


def test_the_two_node_vllm_job_script_is_the_golden_one():
    script = render(_session())
    if os.environ.get("LLMFLOW_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), f"the job script changed; see the module docstring to regenerate {GOLDEN}"


def test_the_golden_job_script_parses_in_bash():
    subprocess.run(["bash", "-n", str(GOLDEN)], check=True)


def test_the_job_script_with_the_real_supervisor_parses_in_bash(tmp_path: Path):
    config = _session(nodes=3, tensor_parallel_size=4, pipeline_parallel_size=3)
    driver = SlurmDriver(config)
    script = slurm_jobs.render_job_script(
        opts=config.placement.slurm, job_name="j", **driver.start_args(RUN_DIR), **driver.multinode_args()
    )
    (tmp_path / "job.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], check=True)
    assert "#SBATCH --nodes=3" in script and "--tensor-parallel-size 4 --pipeline-parallel-size 3" in script


def test_the_head_serves_over_ray_and_the_workers_join_it():
    launch = engines.spec_for(_session().engine).launch_multinode(
        ModelConfig(path=Path("/m"), served_name="m"), "{bind_host}", None, 2
    )
    assert launch.style == "ray"
    argv = launch.head.argv
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert f"--address={RAY_HEAD_PLACEHOLDER}" in launch.worker_argv and "--block" in launch.worker_argv
    assert "VLLM_HOST_IP={bind_host}" in launch.worker_argv


def test_extra_args_stay_last_on_the_head():
    launch = engines.spec_for(VllmEngine(pipeline_parallel_size=2, extra_args=["--enforce-eager"])).launch_multinode(
        ModelConfig(path=Path("/m"), served_name="m"), "0.0.0.0", None, 2
    )
    assert launch.head.argv[-3:] == ["--distributed-executor-backend", "ray", "--enforce-eager"]


@pytest.mark.parametrize(("tp", "pp", "nodes"), [(1, 1, 2), (1, 3, 2), (3, 1, 2), (2, 2, 3)])
def test_workers_that_nodes_cannot_share_evenly_are_refused_naming_the_fields(tp, pp, nodes):
    spec = engines.spec_for(VllmEngine(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel_size x engine\.pipeline_parallel_size") as err:
        spec.launch_multinode(ModelConfig(path=Path("/m")), "0.0.0.0", None, nodes)
    assert f"placement.nodes {nodes}" in str(err.value)


@pytest.mark.parametrize(("tp", "pp", "nodes"), [(1, 2, 2), (8, 2, 2), (2, 1, 2), (4, 3, 3), (1, 4, 2)])
def test_workers_shared_evenly_by_the_nodes_are_accepted(tp, pp, nodes):
    spec = engines.spec_for(VllmEngine(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    assert spec.launch_multinode(ModelConfig(path=Path("/m")), "0.0.0.0", None, nodes).style == "ray"


@pytest.mark.parametrize("arg", [["--distributed-executor-backend", "mp"], ["--distributed-executor-backend=mp"]])
def test_an_executor_backend_of_ones_own_is_refused_on_several_nodes(arg):
    spec = engines.spec_for(VllmEngine(pipeline_parallel_size=2, extra_args=arg))
    with pytest.raises(ConfigError, match="engine.extra_args"):
        spec.launch_multinode(ModelConfig(path=Path("/m")), "0.0.0.0", None, 2)

"""Job script rendering and Slurm output parsing: pure functions, no cluster."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from llmflow import engines
from llmflow.config import LlamaCppEngine, ModelConfig, SlurmOptions
from llmflow.errors import JobRejected
from llmflow.placements import slurm_jobs as slurm
from llmflow.remote import start_script as remote_script

NASTY = 'it\'s a "quoted" $HOME `x` value'


def _render(tmp_path: Path, lease_ttl_s: float | None = None, **opts) -> str:
    engine = LlamaCppEngine(
        venv=Path("/scratch/my venvs/llama"),
        setup=[
            "module load cuda/12.4",
            "source '/scratch/my venvs/llama/bin/activate'",
            "export HF_HOME=/scratch/hf",
            "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        ],
    )
    spec = engines.spec_for(engine).launch(ModelConfig(path=Path("/models/it's big.gguf")), "0.0.0.0", None)
    return slurm.render_job_script(
        opts=SlurmOptions(**opts),
        job_name="llmflow-run 1",
        run_dir="/home/u/llmflow runs/r1",
        setup=spec.setup,
        server_python=str(engines.spec_for(engine).server_python()),
        server_argv=spec.argv,
        bind_host="0.0.0.0",
        launcher_source=remote_script.launcher_source(),
        lease_ttl_s=lease_ttl_s,
    )


def _sbatch_options(script: str) -> list[list[str]]:
    return [shlex.split(line[len("#SBATCH ") :]) for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_job_script_quotes_every_value(tmp_path: Path):
    script = _render(
        tmp_path,
        partition="gpu",
        account=NASTY,
        qos="high",
        gres="gpu:v100:1",
        cpus_per_task=8,
        mem="64G",
        time="04:00:00",
        constraint="a100|h100",
        extra_sbatch=["--exclusive", f"--comment={NASTY}"],
    )
    opts = _sbatch_options(script)
    assert ["--job-name=llmflow-run 1"] in opts
    assert [f"--account={NASTY}"] in opts and [f"--comment={NASTY}"] in opts
    assert ["--gres=gpu:v100:1"] in opts and ["--cpus-per-task=8"] in opts and ["--mem=64G"] in opts
    assert ["--constraint=a100|h100"] in opts and ["--exclusive"] in opts and ["--requeue"] in opts
    assert ["--output=/home/u/llmflow runs/r1/slurm-%j.out"] in opts
    assert "module load cuda/12.4" in script and "export HF_HOME=/scratch/hf" in script
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)[1:]
    assert argv[0] == "/scratch/my venvs/llama/bin/python"
    assert "/models/it's big.gguf" in argv and "{port}" in argv
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_unset_options_are_left_out_and_key_never_in_script(tmp_path: Path):
    script = _render(tmp_path)
    flat = [o[0].split("=")[0] for o in _sbatch_options(script)]
    assert "--partition" not in flat and "--gres" not in flat and "--time" in flat
    assert 'API_KEY="$(cat api_key)"' in script  # read from the 0600 file at run time


def test_the_supervisor_watches_the_run_folders_heartbeat_for_the_lease_ttl(tmp_path: Path):
    exec_line = next(line for line in _render(tmp_path, lease_ttl_s=90).splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)
    at = argv.index("--heartbeat-file")
    assert argv[at : at + 4] == ["--heartbeat-file", "/home/u/llmflow runs/r1/heartbeat", "--lease-ttl", "90"]
    assert argv.index("--") > at  # the supervisor's options, not the server's
    no_switch = next(line for line in _render(tmp_path).splitlines() if line.startswith("exec "))
    assert "--heartbeat-file" not in no_switch


def test_embedded_launcher_is_the_real_one(tmp_path: Path):
    script = _render(tmp_path)
    body = re.search(
        rf"<<'{remote_script.LAUNCHER_DELIMITER}'\n(.*?)\n{remote_script.LAUNCHER_DELIMITER}\n", script, re.S
    ).group(1)
    assert body + "\n" == remote_script.launcher_source()


def test_parse_sbatch():
    assert slurm.parse_sbatch("42\n") == "42"
    assert slurm.parse_sbatch("42;cluster\n") == "42"
    with pytest.raises(JobRejected, match="could not read a job id"):
        slurm.parse_sbatch("sbatch: error: nope")


def test_parse_squeue_scontrol_sacct():
    info = slurm.parse_squeue("7", "7|PENDING|Resources|\n")
    assert info.state == "PENDING" and info.reason == "Resources" and not info.terminal and not info.running
    assert slurm.parse_squeue("7", "") is None
    text = (
        "JobId=7 JobName=llmflow-x\n   JobState=RUNNING Reason=None Dependency=(null)\n"
        "   Requeue=1 Restarts=2 BatchFlag=1\n   RunTime=1-02:03:04 TimeLimit=2-00:00:00\n   NodeList=gpu017\n"
    )
    info = slurm.parse_scontrol("7", text)
    assert (info.state, info.reason, info.nodes, info.restarts) == ("RUNNING", "", "gpu017", 2)
    assert info.elapsed_s == 86400 + 2 * 3600 + 3 * 60 + 4
    assert slurm.parse_scontrol("7", "slurm_load_jobs error: Invalid job id specified") is None
    info = slurm.parse_sacct("7", "7|CANCELLED by 0|None|gpu017|3600\n")
    assert info.state == "CANCELLED" and info.terminal and info.elapsed_s == 3600


@pytest.mark.parametrize("state", ["PENDING", "CONFIGURING", "REQUEUED", "PREEMPTED", "SUSPENDED"])
def test_waiting_states_are_not_terminal(state):
    assert state in slurm.WAITING and state not in slurm.TERMINAL


@pytest.mark.parametrize(
    "state", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"]
)
def test_terminal_states(state):
    assert slurm.JobInfo(job_id="1", state=state).terminal


@pytest.mark.parametrize(
    ("gres", "gpus"), [(None, 0), ("gpu", 1), ("gpu:2", 2), ("gpu:v100:4", 4), ("gpu:a100:1,nvme:1", 1)]
)
def test_gpus_in_gres(gres, gpus):
    assert slurm.gpus_in_gres(gres) == gpus


def test_registry_file_sits_beside_the_run_folders():
    from llmflow.placements.base import registry_file

    assert registry_file("/home/u/llmflow-runs/set-1/set-1-r0") == "/home/u/llmflow-runs/set-1/registry/set-1-r0.json"
    assert registry_file("/home/u/llmflow-runs/run-1/") == "/home/u/llmflow-runs/registry/run-1.json"


def test_time_left_is_read_in_every_squeue_form():
    from llmflow.placements.slurm_jobs import parse_time_left

    assert parse_time_left("45") == 45
    assert parse_time_left("1:05") == 65
    assert parse_time_left("2:00:01") == 7201
    assert parse_time_left("1-00:00:10\n") == 86410
    assert parse_time_left("UNLIMITED") is None and parse_time_left("INVALID") is None and parse_time_left("") is None


def _job(state: str, reason: str = "", nodes: str = "") -> slurm.JobInfo:
    return slurm.JobInfo(job_id="42", state=state, reason=reason, nodes=nodes)


def test_queue_watch_logs_each_change_once_and_reminds_while_pending():
    """A queued job used to be silent: each change of state or reason is one line (not one per
    poll), a reminder comes every minute while nothing changes, and RUNNING names the node."""
    watch = slurm.QueueWatch("42", remind_every_s=60)
    polls = [
        (0, _job("PENDING", "Resources")),
        (2, _job("PENDING", "Resources")),
        (10, _job("PENDING", "Priority")),
        (40, _job("PENDING", "Priority")),
        (70, _job("PENDING", "Priority")),
        (72, _job("PENDING", "Priority")),
        (140, _job("RUNNING", nodes="node2")),
        (142, _job("RUNNING", nodes="node2")),
    ]
    lines = [line for now, info in polls if (line := watch.note(info, now)) is not None]
    assert lines == [
        "job 42: PENDING (Resources)",
        "job 42: PENDING (Priority) after 10s",
        "job 42: still PENDING (Priority) after 1m10s",
        "job 42: RUNNING on node2 after 2m20s in the queue",
    ]


def test_human_duration_and_job_description():
    assert [slurm.human_duration(s) for s in (0, 45.4, 130, 3725)] == ["0s", "45s", "2m10s", "1h02m"]
    assert _job("PENDING").describe() == "PENDING"
    assert _job("REQUEUED", "BeginTime").describe() == "REQUEUED (BeginTime)"
    assert _job("RUNNING", nodes="node[1-2]").describe() == "RUNNING on node[1-2]"

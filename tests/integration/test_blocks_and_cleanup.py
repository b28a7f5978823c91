"""The cluster block against a real Prefect API, and releasing a Slurm job a dead run left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks import SlurmCluster
from llmflow.config import SessionConfig, SlurmOptions, SlurmPlacement, SSHLogin
from llmflow.placements import release_leftovers
from llmflow.placements.slurm import SlurmDriver
from tests.conftest import orphan_lease
from tests.integration.test_slurm import _jobs_of, _login

pytestmark = pytest.mark.integration


def test_cluster_block_round_trip_keeps_the_secret_secret(prefect_api_url):
    from prefect.client.orchestration import get_client

    block = SlurmCluster(
        placement=SlurmPlacement(
            login=SSHLogin(host="login.example.org", user="me", key_passphrase="hunter2", proxy_jump="bastion:2222"),
            slurm=SlurmOptions(partition="gpu", gres="gpu:a100:1", time="08:00:00"),
        )
    )
    block.save("test-della", overwrite=True)
    loaded = SlurmCluster.load("test-della")
    placement = loaded.placement
    assert placement.slurm.gres == "gpu:a100:1" and placement.login.proxy_jump == "bastion:2222"
    assert placement.login.key_passphrase.get_secret_value() == "hunter2"
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name("test-della", "llmflow-slurm-cluster", include_secrets=False)
    assert "hunter2" not in json.dumps(doc.data, default=str)


def test_a_dead_runs_slurm_job_is_cancelled_by_cleanup(test_cluster, server_env, tmp_path: Path):
    venv, model = server_env
    config = SessionConfig.model_validate(
        {
            "placement": {
                "kind": "slurm",
                "login": _login(test_cluster).model_dump(),
                "remote_runs_dir": str(tmp_path / "cluster"),
                "bind_host": "127.0.0.1",
                "connect_host": "127.0.0.1",
                "poll_interval_s": 0.5,
                "queue_deadline_s": 120,
            },
            "engine": {"venv": str(venv)},
            "model": {"path": str(model)},
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    alloc = SlurmDriver(config).allocate("dead-run")
    assert _jobs_of(tmp_path), "the job should be queued or running"
    lease_file = orphan_lease(alloc.run_dir)  # as if its flow process had been killed
    released = release_leftovers(config.runs_dir)
    assert [lease.job_id for lease in released] == [alloc.job_id]
    assert _jobs_of(tmp_path) == [] and not lease_file.exists()
    again = SlurmDriver(config).teardown(alloc)  # teardown after a cleanup: nothing left, no error
    assert again.already_gone and again.cancelled_job is None


def test_model_server_block_round_trip_and_a_flow_started_by_block_names(prefect_api_url, server_env, tmp_path: Path):
    """A Model Server block saved once (here llama.cpp's server with its own n_ctx) is what a
    batch run started by block name serves."""
    from blocks import ModelServer
    from flows.batch import batch_inference
    from llmflow.config import SAMPLE_INPUT, BatchConfig, LlamaCppEngine, ModelConfig

    venv, model = server_env
    ModelServer(
        engine=LlamaCppEngine(venv=venv, n_ctx=512), model=ModelConfig(path=model, served_name="from-block")
    ).save("test-tiny", overwrite=True)
    loaded = ModelServer.load("test-tiny")
    assert loaded.engine.kind == "llama_cpp" and loaded.engine.n_ctx == 512 and loaded.model.served_name == "from-block"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(SAMPLE_INPUT.read_text().splitlines(keepends=True)[:10]))
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=SessionConfig(runs_dir=tmp_path / "runs", model=ModelConfig(served_name="ignored")),
        batch=BatchConfig(input_path=src, output_path=out),
        model_server_block="test-tiny",
    )
    assert result.report.succeeded == 10
    summary = json.loads(result.tokps.summary_path.read_text())
    assert summary["served_models"] == ["from-block"]  # what the server itself listed at /v1/models

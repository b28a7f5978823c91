"""Prefect-native operation, for real: a `prefect server start` (SQLite) of its own, a process work
pool and worker, deployments/deploy.py (the documented equivalent of `prefect deploy --all`), runs started through the
API the UI uses, artifacts and events read back through it, and a cancellation mid-batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterId
from prefect.states import Cancelling

from llmflow.config import PROJECT_ROOT, SAMPLE_INPUT
from llmflow.remote.leases import read_lease
from tests import fault_matrix
from tests.conftest import llama_processes
from tests.integration.prefect_stack import (
    deploy,
    postgres,
    prefect_client,
    prefect_server_and_worker,
    wait_state,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Prefect server on SQLite, with a work pool and a worker."""
    with prefect_server_and_worker(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


def _parameters(tmp_path: Path, lines: int, concurrency: int = 4) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(SAMPLE_INPUT.read_text().splitlines(keepends=True)[:lines])
        if lines <= 240
        else "".join(
            json.dumps({**json.loads(SAMPLE_INPUT.read_text().splitlines()[i % 240]), "custom_id": f"r{i}"}) + "\n"
            for i in range(lines)
        )
    )
    model = tmp_path / "model" / "tiny.gguf"
    model.parent.mkdir(exist_ok=True)
    shutil.copy(PROJECT_ROOT / "models" / "tiny-llama.gguf", model)
    return {
        "session": {"model": {"path": str(model)}, "runs_dir": str(tmp_path / "runs")},
        "batch": {"input_path": str(src), "output_path": str(tmp_path / "out.jsonl"), "concurrency": concurrency},
    }


def test_deploy_schedule_trigger_from_the_api_and_read_the_artifacts(prefect_server, server_env, tmp_path: Path):
    _deploy_trigger_and_check(prefect_server, tmp_path)


def test_the_same_on_a_prefect_server_backed_by_postgresql(server_env, tmp_path: Path):
    """Teams that schedule every night outgrow SQLite: the whole path once on PostgreSQL."""
    (tmp_path / "prefect-home").mkdir()
    with (
        postgres() as (db_url, psql),
        prefect_server_and_worker(tmp_path / "prefect-home", {"PREFECT_API_DATABASE_CONNECTION_URL": db_url}) as env,
    ):
        _deploy_trigger_and_check(env, tmp_path / "run")
        # the runs, their artifacts and the deployments' schedules are rows in PostgreSQL
        rows = subprocess.run(
            [*psql, "select count(*) from artifact where key = 'batch-summary'"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert rows == "1"
    assert not list((tmp_path / "prefect-home").glob("*.db")), "the server fell back to SQLite"


def _deploy_trigger_and_check(prefect_server: dict[str, str], tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    res = deploy(prefect_server)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with prefect_client(prefect_server) as client:
        nightly = client.read_deployment_by_name("batch-inference/nightly-batch")
        schedule = nightly.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
        # the server's scheduler puts the next nightly runs in the calendar
        deadline = time.monotonic() + 60
        while not (
            upcoming := client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[nightly.id]))
            )
        ):
            assert time.monotonic() < deadline, "no scheduled run of the nightly deployment after 60 s"
            time.sleep(1)
        assert upcoming[0].state.type.value == "SCHEDULED" and upcoming[0].expected_start_time.hour in (
            0,
            1,
        )  # 02:00 Berlin in UTC

        on_demand = client.read_deployment_by_name("batch-inference/batch")
        run = client.create_flow_run_from_deployment(on_demand.id, parameters=_parameters(tmp_path, 40))
        assert wait_state(client, run.id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 300) == "COMPLETED"
        artifacts = {
            a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        }
        assert {"batch-summary", "batch-report"} <= set(artifacts)
        row = json.loads(artifacts["batch-summary"].data)[0]
        assert row["succeeded"] == 40 and row["placement"] == "local" and row["completion_tokens"] > 0
        assert "40 ok" in artifacts["batch-report"].data
        kinds = {
            a.type for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        }
        assert "progress" in kinds
    # the finished batch emitted an event with its summary (events are stored asynchronously)
    deadline, events = time.monotonic() + 30, []
    while not any(e["payload"].get("succeeded") == 40 for e in events):
        assert time.monotonic() < deadline, f"no llmflow.batch.finished event with the summary: {events}"
        time.sleep(1)
        resp = httpx.post(
            f"{prefect_server['PREFECT_API_URL']}/events/filter",
            json={"filter": {"event": {"name": ["llmflow.batch.finished"]}}, "limit": 10},
        )
        assert resp.status_code == 200, resp.text
        events = resp.json()["events"]
    assert llama_processes(str(tmp_path)) == []


@pytest.mark.parametrize("replicas", [1, 2])
def test_cancel_from_the_api_mid_batch_tears_the_server_down(prefect_server, server_env, tmp_path: Path, replicas):
    params = _parameters(tmp_path, 5000, concurrency=1)
    params["session"]["replicas"] = replicas
    with prefect_client(prefect_server) as client:
        if not client.read_deployments():
            assert deploy(prefect_server).returncode == 0
        deployment = client.read_deployment_by_name("batch-inference/batch")
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        out = tmp_path / "out.jsonl"
        deadline = time.monotonic() + 300
        while not (out.exists() and len(out.read_text().splitlines()) >= 20):
            assert time.monotonic() < deadline, "the batch did not get going in 300 s"
            time.sleep(0.5)
        assert llama_processes(str(tmp_path)), "the server should be running mid-batch"
        client.set_flow_run_state(run.id, Cancelling(), force=True)
        cancelled_at = time.monotonic()
        assert wait_state(client, run.id, {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}, 90) == "CANCELLED"
    while llama_processes(str(tmp_path)) and time.monotonic() - cancelled_at < 30:
        time.sleep(0.5)
    assert llama_processes(str(tmp_path)) == [], "the server outlived the cancellation by 30 s"
    assert len(out.read_text().splitlines()) < 5000
    assert all(read_lease(d) is None for d in (tmp_path / "runs").iterdir())


def test_node_limit_lets_one_session_at_a_time_hold_a_node(prefect_server, server_env, tmp_path: Path, request):
    """Two batch runs started together against a limit of one node: the second allocates only
    after the first released its server. A limit that does not exist fails at once, clearly."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with prefect_client(prefect_server) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="test-nodes", limit=1))
    params = _parameters(tmp_path, 40, concurrency=1)
    procs = []
    for i in (0, 1):
        config = tmp_path / f"config-{i}.json"
        config.write_text(
            json.dumps(
                {"session": {**params["session"], "runs_dir": str(tmp_path / f"runs-{i}"), "node_limit": "test-nodes"}}
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "batch",
                    params["batch"]["input_path"],
                    "-o",
                    str(tmp_path / f"out-{i}.jsonl"),
                    "--config",
                    str(config),
                    "--concurrency",
                    "1",
                ],
                env=prefect_server,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    windows = []
    for i in (0, 1):
        (run_dir,) = (tmp_path / f"runs-{i}").iterdir()
        started = (run_dir / "endpoint.json").stat().st_mtime  # written once, when its server started
        windows.append((started, (tmp_path / f"out-{i}.jsonl").stat().st_mtime))  # last record written
    (first_start, first_end), (second_start, second_end) = sorted(windows)
    assert second_start > first_end, f"the sessions overlapped: {windows}"
    src = Path(params["batch"]["input_path"])
    row = fault_matrix.record(
        request.node.nodeid, "two runs at once", "local", folder=tmp_path,
        more_runs=[(src, tmp_path / "out-0.jsonl"), (src, tmp_path / "out-1.jsonl")],
        did=f"two batches started together, node_limit 1: the second waited {second_start - first_end:.1f}s after the "
        "first released its server, then ran; each wrote every line",
        final_state="both Completed, exit 0",
    )  # fmt: skip
    assert (row["lost"], row["duplicates"], row["processes_left"], row["leases_left"]) == (0, 0, 0, 0)

    config = tmp_path / "config-missing.json"
    config.write_text(json.dumps({"session": {**params["session"], "node_limit": "no-such-limit"}}))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "batch",
            params["batch"]["input_path"],
            "-o",
            str(tmp_path / "o.jsonl"),
            "--config",
            str(config),
        ],
        env=prefect_server,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1 and "prefect gcl create no-such-limit" in res.stdout + res.stderr
    assert llama_processes(str(tmp_path)) == []


def test_campaign_deployment_run_from_the_api_writes_its_table_and_report(prefect_server, server_env, tmp_path: Path):
    """What pressing Run on benchmark-campaign/campaign does: the worker runs the campaign
    given as a form (here: the API), and its artifacts are there for the UI."""
    with prefect_client(prefect_server) as client:
        if not {d.name for d in client.read_deployments()} >= {"nightly-campaign", "campaign"}:
            assert deploy(prefect_server).returncode == 0
        nightly = client.read_deployment_by_name("benchmark-campaign/nightly-campaign")
        assert nightly.schedules and nightly.parameters == {"campaign_file": "benchmarks/campaigns/tiny-llama-cpp.toml"}
        deployment = client.read_deployment_by_name("benchmark-campaign/campaign")
        params = _parameters(tmp_path, 1)
        params.pop("batch")
        params["session"]["engine"] = {"kind": "llama_cpp", "n_ctx": 256}
        params["campaign"] = {
            "name": "from-ui",
            "context_sizes": [32, 64, 128, 512],
            "concurrencies": [1, 2],
            "output_tokens": [4],
            "output_dir": str(tmp_path / "campaign"),
        }
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        assert wait_state(client, run.id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 300) == "COMPLETED"
        artifacts = {
            a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        }
        assert {"campaign-from-ui", "campaign-from-ui-report"} <= set(artifacts)
        statuses = [row["status"] for row in json.loads(artifacts["campaign-from-ui"].data)]
        assert statuses == ["ok", "ok", "ok", "rejected"] * 2
    assert (tmp_path / "campaign" / "plot.png").exists() and (tmp_path / "campaign" / "requests.parquet").exists()
    assert llama_processes(str(tmp_path)) == []


def test_cancel_a_replicated_hold_on_slurm_from_the_api_leaves_nothing(
    prefect_server, test_cluster, server_env, tmp_path: Path
):
    """The hold deployment with two Slurm replicas behind nginx, cancelled from the API once both
    serve: no job, no nginx, no SSH forward, no lease left."""
    from tests.integration.test_replicas import _nothing_left, _until, _upstreams_if
    from tests.integration.test_slurm import _login

    venv, model = server_env
    session = {
        "placement": {
            "kind": "slurm",
            "login": _login(test_cluster).model_dump(mode="json"),
            "remote_runs_dir": str(tmp_path / "cluster-runs"),
            "bind_host": "@node",
            "poll_interval_s": 0.5,
            "queue_deadline_s": 120,
            "slurm": {"cpus_per_task": os.cpu_count() or 1},
        },
        "engine": {"kind": "llama_cpp", "venv": str(venv)},
        "model": {"path": str(model)},
        "runs_dir": str(tmp_path / "runs"),
        "replicas": 2,
    }
    with prefect_client(prefect_server) as client:
        if not client.read_deployments():
            assert deploy(prefect_server).returncode == 0
        deployment = client.read_deployment_by_name("hold-session/hold")
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"session": session, "hours": 1, "check_every_s": 2}
        )
        serving = _until(lambda: any(_upstreams_if(c, 2) for c in (tmp_path / "runs").glob("*/nginx.conf")), 300, 0.5)
        assert serving, "both replicas behind nginx"
        client.set_flow_run_state(run.id, Cancelling(), force=True)
        assert wait_state(client, run.id, {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}, 120) == "CANCELLED"
    _nothing_left(tmp_path, test_cluster["LLMFLOW_TEST_SSH_PORT"])

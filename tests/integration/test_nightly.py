"""The nightly deployment, night after night: its own Prefect server and worker (the fixtures of
test_deployments.py), the real `batch-inference/nightly-batch` deployment and its output-path
template, flow runs scheduled on two different nights, then a rerun on the second night.

Each night writes its own file and sends every request; the rerun finds nothing left to send,
starts no server and leaves the night's summary as it was."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.states import Scheduled

from tests.conftest import llama_processes
from tests.integration.prefect_stack import deploy, prefect_client, prefect_server_and_worker, wait_state
from tests.integration.test_deployments import _parameters

pytestmark = pytest.mark.integration

LINES = 24
# 23:30 UTC is already the next day in Berlin (the deployment's timezone, UTC+1 in March):
# the files must be named by the Berlin dates, 03-01 and 03-02, not the UTC ones.
NIGHTS = {
    "2026-03-01": datetime(2026, 2, 28, 23, 30, tzinfo=UTC),
    "2026-03-02": datetime(2026, 3, 1, 23, 30, tzinfo=UTC),
}
SAME_NIGHT_AGAIN = datetime(2026, 3, 1, 23, 45, tzinfo=UTC)  # 00:45 on 2026-03-02 in Berlin


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Prefect server of this module's own, with the llmflow work pool and a worker."""
    with prefect_server_and_worker(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


def _custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


def _run_on(client, deployment_id, parameters: dict, scheduled: datetime) -> tuple:
    """One flow run of the deployment, scheduled (expected to start) at ``scheduled``, run by the
    worker at once since that time is past; its final state and how long it ran."""
    run = client.create_flow_run_from_deployment(
        deployment_id, parameters=parameters, state=Scheduled(scheduled_time=scheduled)
    )
    assert client.read_flow_run(run.id).expected_start_time == scheduled
    final = wait_state(client, run.id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 300)
    run = client.read_flow_run(run.id)
    logs = _flow_logs(client, run.id, "Finished in state")
    assert final == "COMPLETED", "\n".join(logs)[-3000:]
    return run, run.total_run_time.total_seconds(), logs


def _flow_logs(client, flow_run_id, last: str, timeout_s: float = 30) -> list[str]:
    """The run's log lines once the one containing ``last`` is in (logs are shipped in batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        if any(last in m for m in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def test_the_nightly_deployment_writes_each_night_to_its_own_file_and_a_rerun_sends_nothing(
    prefect_server, server_env, tmp_path: Path
):
    res = deploy(prefect_server)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    params = _parameters(tmp_path, LINES)
    expected_ids = _custom_ids(Path(params["batch"]["input_path"]))
    runs_dir = Path(params["session"]["runs_dir"])
    with prefect_client(prefect_server) as client:
        nightly = client.read_deployment_by_name("batch-inference/nightly-batch")
        template = nightly.parameters["batch"]["output_path"]
        assert "{date}" in template
        params["batch"]["output_path"] = str(tmp_path / template)  # the deployment's own name, under tmp_path

        took = {}
        for date, scheduled in NIGHTS.items():
            run, took[date], logs = _run_on(client, nightly.id, params, scheduled)
            out = tmp_path / template.format(date=date)
            assert any(f"output {out} (from " in m for m in logs), logs
            assert sorted(_custom_ids(out)) == sorted(expected_ids)  # every request, once, that night
            summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
            (one,) = summary["passes"]
            assert (one["sent"], one["succeeded"], one["flow_run_id"]) == (LINES, LINES, str(run.id))
            assert summary["total"]["sent"] == LINES and summary["throughput"]["requests"] == LINES
        outputs = sorted(p.name for p in (tmp_path / "out").glob("nightly-*.jsonl") if "errors" not in p.name)
        assert outputs == ["nightly-2026-03-01.jsonl", "nightly-2026-03-02.jsonl"]
        assert len(list(runs_dir.iterdir())) == 2  # one model session per night

        second = tmp_path / template.format(date="2026-03-02")
        summary_path = second.with_name(second.stem + ".summary.json")
        summary_before, output_before = summary_path.read_bytes(), second.read_bytes()
        again, took["rerun"], logs = _run_on(client, nightly.id, params, SAME_NIGHT_AGAIN)
        assert f"nothing left to send: all {LINES} requests of {params['batch']['input_path']} are in {second}" in logs
        assert "nothing left to send" in again.state.message
        assert len(list(runs_dir.iterdir())) == 2  # no new run folder: no server was started
        assert client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.id]))) == []
        assert summary_path.read_bytes() == summary_before and second.read_bytes() == output_before
        (report,) = [
            a
            for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.id])))
            if a.key == "batch-report"
        ]
        assert report.data.startswith("# Nothing left to send")
    assert llama_processes(str(tmp_path)) == []
    print(f"\nflow run times (s): {took}")
    assert took["rerun"] < min(took[d] for d in NIGHTS)

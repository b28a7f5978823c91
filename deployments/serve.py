"""Serve the project's deployments from one process: no work pool, no worker.

    .venv/bin/python deployments/serve.py      # with PREFECT_API_URL set (a `prefect server start`)

The process stays up, starts each run (scheduled, or from the UI's Run button) as a
subprocess, and cancels it when the run is cancelled from the UI or the API (the flow gets
SIGTERM and its session tears the server down). ``LLMFLOW_NIGHTLY_CRON`` and
``LLMFLOW_TIMEZONE`` override the nightly schedule.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "deployments")]  # flows/, tasks/ and definitions from the repository

from definitions import DEPLOYMENTS  # noqa: E402
from prefect import serve  # noqa: E402
from prefect.flows import load_flow_from_entrypoint  # noqa: E402
from prefect.schedules import Cron  # noqa: E402


def runner_deployments() -> list:
    """RunnerDeployments for ``serve``, one per definition."""
    out = []
    for spec in DEPLOYMENTS:
        flow = load_flow_from_entrypoint(str(ROOT / spec.entrypoint))
        out.append(
            flow.to_deployment(
                name=spec.name,
                description=spec.description,
                tags=spec.tags,
                parameters=spec.parameters,
                schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
            )
        )
    return out


if __name__ == "__main__":
    serve(*runner_deployments())

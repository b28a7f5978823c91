"""Register the project's deployments on a process work pool (what `prefect deploy --all` does).

    .venv/bin/prefect work-pool create llmflow --type process       # once
    .venv/bin/python deployments/deploy.py                           # from anywhere in the checkout
    .venv/bin/prefect worker start --pool llmflow                    # runs what the schedule or the UI starts

Why not `prefect deploy --all --prefect-file deployments/prefect.yaml`: with prefect 3.8.8 and the
fastapi<0.151 it needs, `prefect deploy` creates the first deployment and then stops on a 422
(its client sends `limit: null` to /work_pools/{name}/workers/filter, which that server rejects).
This script registers the same deployments through the Python API (RunnerDeployment.apply,
which does not make that call). The code is not copied
anywhere: the worker runs each flow from this checkout (the deployment's pull step sets the
working directory to it).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "deployments")]

from definitions import DEPLOYMENTS, WORK_POOL  # noqa: E402
from prefect.flows import Flow  # noqa: E402
from prefect.schedules import Cron  # noqa: E402


def deploy(work_pool: str = WORK_POOL) -> list[str]:
    """Create or update every deployment on ``work_pool``; returns their ids."""
    ids = []
    for spec in DEPLOYMENTS:
        flow = Flow.from_source(source=str(ROOT), entrypoint=spec.entrypoint)
        deployment = flow.to_deployment(
            name=spec.name,
            description=spec.description,
            tags=spec.tags,
            parameters=spec.parameters,
            schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
        )
        # RunnerDeployment.apply, not Flow.deploy: every deploy path first asks for online workers
        # and trips over the 422 described above
        ids.append(str(deployment.apply(work_pool_name=work_pool)))
    return ids


if __name__ == "__main__":
    for name, deployment_id in zip((s.name for s in DEPLOYMENTS), deploy()):
        print(f"deployed {name}: {deployment_id}")

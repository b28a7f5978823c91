"""The project's deployments, defined once: ``serve.py`` serves them from one process and
``deploy.py`` registers them on a work pool. ``prefect.yaml`` says the same for `prefect deploy`
(a unit test keeps the three in step)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

NIGHTLY_CRON = os.environ.get("LLMFLOW_NIGHTLY_CRON", "0 2 * * *")
CAMPAIGN_CRON = os.environ.get("LLMFLOW_CAMPAIGN_CRON", "0 4 * * *")
TIMEZONE = os.environ.get("LLMFLOW_TIMEZONE", "Europe/Berlin")
WORK_POOL = os.environ.get("LLMFLOW_WORK_POOL", "llmflow")


@dataclass(frozen=True)
class DeploymentSpec:
    """What differs between deployments; the flow's own parameter models give the UI its forms."""

    name: str
    entrypoint: str
    description: str
    tags: list[str]
    cron: str | None = None
    timezone: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


DEPLOYMENTS = [
    DeploymentSpec(
        name="nightly-batch",
        entrypoint="flows/batch.py:batch_inference",
        description="Every night, serve the model, run the batch file into that night's own output file (a rerun the same night resumes it), record tok/s, release the node.",
        tags=["llmflow", "batch", "nightly"],
        cron=NIGHTLY_CRON,
        timezone=TIMEZONE,
        parameters={"batch": {"output_path": "out/nightly-{date}.jsonl"}},
    ),
    DeploymentSpec(
        name="batch",
        entrypoint="flows/batch.py:batch_inference",
        description="Batch inference started by hand from the UI (no schedule); fill in the session and batch forms.",
        tags=["llmflow", "batch"],
    ),
    DeploymentSpec(
        name="nightly-campaign",
        entrypoint="flows/campaign.py:benchmark_campaign",
        description="Every night, measure TTFT, prefill/decode tok/s and survival across context sizes and concurrency; flag regressions against the night before.",
        tags=["llmflow", "benchmark", "nightly"],
        cron=CAMPAIGN_CRON,
        timezone=TIMEZONE,
        parameters={"campaign_file": "benchmarks/campaigns/tiny-llama-cpp.toml"},
    ),
    DeploymentSpec(
        name="campaign",
        entrypoint="flows/campaign.py:benchmark_campaign",
        description="A stress-test campaign started by hand from the UI: fill in the campaign form (or name a campaign file) and the session.",
        tags=["llmflow", "benchmark"],
    ),
    DeploymentSpec(
        name="hold",
        entrypoint="flows/hold.py:hold_session",
        description="Serve the model for some hours for interactive use (with replicas: behind one nginx URL); the run's log says where. Cancel ends it early.",
        tags=["llmflow", "hold"],
    ),
]

"""deployments/prefect.yaml, deploy.py and serve.py describe the same deployments."""

from __future__ import annotations

import sys

import yaml

from llmflow.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "deployments"))

from definitions import DEPLOYMENTS  # noqa: E402


def test_prefect_yaml_matches_the_python_definitions():
    doc = yaml.safe_load((PROJECT_ROOT / "deployments" / "prefect.yaml").read_text())
    in_yaml = {d["name"]: d for d in doc["deployments"]}
    assert set(in_yaml) == {spec.name for spec in DEPLOYMENTS}
    for spec in DEPLOYMENTS:
        d = in_yaml[spec.name]
        assert d["entrypoint"] == spec.entrypoint and d["tags"] == spec.tags and d["description"] == spec.description
        assert d.get("parameters", {}) == spec.parameters
        schedules = d.get("schedules") or []
        assert [(s["cron"], s["timezone"]) for s in schedules] == ([(spec.cron, spec.timezone)] if spec.cron else [])
        assert (PROJECT_ROOT / spec.entrypoint.split(":")[0]).exists()


def test_nightly_is_scheduled_and_on_demand_is_not():
    by_name = {spec.name: spec for spec in DEPLOYMENTS}
    assert by_name["nightly-batch"].cron and by_name["nightly-batch"].timezone
    assert by_name["batch"].cron is None
    assert by_name["nightly-campaign"].cron and by_name["campaign"].cron is None


def test_the_nightly_campaign_file_exists_and_validates():
    from llmflow.bench.config import load_campaign

    spec = {s.name: s for s in DEPLOYMENTS}["nightly-campaign"]
    campaign, session = load_campaign(PROJECT_ROOT / spec.parameters["campaign_file"])
    assert campaign.compare_to_last and session is not None


def test_the_nightly_batch_writes_a_new_output_file_each_night():
    """A fixed output path is the resume checkpoint: the second night would send nothing."""
    from datetime import UTC, datetime
    from pathlib import Path

    from llmflow.batch.output_path import render
    from llmflow.config import BatchConfig

    spec = {s.name: s for s in DEPLOYMENTS}["nightly-batch"]
    template = BatchConfig.model_validate(spec.parameters["batch"]).output_path
    nights = [datetime(2026, 3, day, 1, 0, tzinfo=UTC) for day in (1, 2)]
    first, second = (render(template, night, "run", "id") for night in nights)
    assert first != second and first == Path("out/nightly-2026-03-01.jsonl")

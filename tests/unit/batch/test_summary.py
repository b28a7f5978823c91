"""<output>.summary.json across passes: merged, totalled, never overwritten by an empty pass."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmflow.batch.jsonl import summary_path_for
from llmflow.batch.report import read_summary, tok_per_s, write_summary
from llmflow.batch.summary import SummaryPass, merge_summary, pass_of, passes_in, total_of
from llmflow.results import BatchReport
from tests.unit.batch.reports import batch_report

T0 = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)


def _report(tmp_path: Path, **counts) -> BatchReport:
    return batch_report(tmp_path, **{"prompt_tokens": 100, "completion_tokens": 40, "wall_s": 2.0, **counts})


def _pass(sent: int, wall_s: float, run: str, succeeded: int | None = None, failed: int = 0, day: int = 0):
    ok = sent - failed if succeeded is None else succeeded
    start = T0 + timedelta(days=day)
    return SummaryPass(
        started_at=start,
        ended_at=start + timedelta(seconds=wall_s + 5),
        flow_run_id=run,
        run_id=f"session-{run}",
        placement="local",
        sent=sent,
        succeeded=ok,
        failed_http=failed,
        prompt_tokens=10 * sent,
        completion_tokens=4 * sent,
        wall_s=wall_s,
        requests_per_s=round((ok + failed) / wall_s, 3),
        output_tok_per_s=round(4 * sent / wall_s, 3),
        total_tok_per_s=round(14 * sent / wall_s, 3),
    )


def test_the_first_pass_starts_the_list_and_keeps_the_latest_keys():
    latest = {"throughput": {"requests": 10}, "batch": {"sent": 10}, "placement": "local"}
    data = merge_summary(None, latest, _pass(10, 2.0, "r1"))
    assert data["throughput"] == {"requests": 10} and data["placement"] == "local"
    assert [p["flow_run_id"] for p in data["passes"]] == ["r1"]
    assert data["total"]["passes"] == 1 and data["total"]["sent"] == 10 and data["total"]["requests_per_s"] == 5.0


def test_a_second_pass_is_appended_and_the_total_is_over_both():
    first = merge_summary(None, {"batch": {"sent": 6}}, _pass(6, 2.0, "r1", succeeded=5, failed=1))
    data = merge_summary(first, {"batch": {"sent": 4}}, _pass(4, 2.0, "r2", day=1))
    assert [p["sent"] for p in data["passes"]] == [6, 4]
    assert data["passes"][0] == first["passes"][0]  # the earlier pass's own figures are untouched
    assert data["batch"] == {"sent": 4}  # top-level keys: the latest pass, as before
    total = data["total"]
    assert (total["sent"], total["succeeded"], total["failed_http"], total["completion_tokens"]) == (10, 9, 1, 40)
    assert total["wall_s"] == 4.0 and total["requests_per_s"] == 2.5 and total["output_tok_per_s"] == 10.0
    assert total["first_started_at"].startswith("2026-03-01") and total["last_ended_at"].startswith("2026-03-02")


def test_a_pass_that_sent_nothing_leaves_an_existing_summary_as_it_was():
    existing = merge_summary(None, {"batch": {"sent": 10}}, _pass(10, 2.0, "r1"))
    snapshot = json.loads(json.dumps(existing))
    assert merge_summary(existing, {"batch": {"sent": 0}}, _pass(0, 0.5, "r2")) is existing
    assert existing == snapshot


def test_a_retried_record_replaces_its_own_pass():
    first = merge_summary(None, {}, _pass(10, 2.0, "r1"))
    again = merge_summary(first, {}, _pass(10, 2.5, "r1"))
    assert len(again["passes"]) == 1 and again["passes"][0]["wall_s"] == 2.5


OLD_FORMAT = {
    "throughput": {
        "requests": 12, "prompt_tokens": 120, "completion_tokens": 48, "wall_s": 3.0,
        "requests_per_s": 4.0, "output_tok_per_s": 16.0, "total_tok_per_s": 56.0,
    },
    "batch": {
        "sent": 12, "succeeded": 11, "failed_http": 1, "unfinished": 0,
        "prompt_tokens": 120, "completion_tokens": 48, "wall_s": 3.0,
    },
    "placement": "slurm", "node": "n1", "run_id": "old-run",
}  # fmt: skip


def test_an_old_single_pass_summary_is_read_as_one_pass():
    (old,) = passes_in(OLD_FORMAT)
    assert (old.sent, old.succeeded, old.failed_http, old.requests_per_s) == (12, 11, 1, 4.0)
    assert (old.run_id, old.placement, old.started_at, old.flow_run_id) == ("old-run", "slurm", None, None)
    data = merge_summary(OLD_FORMAT, {"batch": {"sent": 4}}, _pass(4, 1.0, "r2"))
    assert [p["sent"] for p in data["passes"]] == [12, 4] and data["total"]["sent"] == 16
    assert data["total"]["first_started_at"] is not None  # the old pass has no times; the new one has


def test_an_old_summary_of_zeros_is_no_pass():
    zeros = {**OLD_FORMAT, "batch": {**OLD_FORMAT["batch"], "sent": 0, "succeeded": 0, "failed_http": 0}}
    assert passes_in(zeros) == []


def test_the_total_of_no_pass_has_no_rate():
    total = total_of([])
    assert (total.passes, total.sent, total.requests_per_s, total.output_tok_per_s) == (0, 0, None, None)


def test_pass_of_takes_this_pass_figures(tmp_path: Path):
    report = _report(tmp_path, already_done=3, sent=7, succeeded=6, failed_http=1)
    tokps = tok_per_s(report, summary_path_for(report.output_path))
    p = pass_of(tokps, report, started_at=T0, ended_at=T0, flow_run_id="fr", run_id="rid", placement="local")
    assert (p.sent, p.succeeded, p.failed_http, p.requests_per_s, p.output_tok_per_s) == (7, 6, 1, 3.5, 20.0)


def _write(tmp_path: Path, sent: int, run: str) -> dict:
    report = _report(tmp_path, sent=sent, succeeded=sent)
    tokps = tok_per_s(report, summary_path_for(report.output_path))
    run_pass = pass_of(tokps, report, started_at=T0, ended_at=T0, flow_run_id=run, run_id=run, placement="local")
    write_summary(tokps, report, run_pass, extra={"run_id": run})
    return json.loads(tokps.summary_path.read_text())


def test_write_summary_keeps_every_pass_and_skips_an_empty_one(tmp_path: Path):
    assert [p["sent"] for p in _write(tmp_path, 10, "r1")["passes"]] == [10]
    two = _write(tmp_path, 5, "r2")
    assert [p["sent"] for p in two["passes"]] == [10, 5] and two["run_id"] == "r2"
    assert two["throughput"]["requests"] == 5 and two["batch"]["sent"] == 5
    before = (tmp_path / "o.summary.json").read_bytes()
    _write(tmp_path, 0, "r3")
    assert (tmp_path / "o.summary.json").read_bytes() == before


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"passes": [{"sent": "many"}]}'])
def test_an_unreadable_summary_is_moved_aside_not_lost(tmp_path: Path, content: str):
    path = tmp_path / "o.summary.json"
    path.write_text(content)
    assert read_summary(path) is None
    assert (tmp_path / "o.summary.json.unreadable").read_text() == content and not path.exists()

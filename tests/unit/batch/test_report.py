"""A batch pass's throughput and merged reports: pure arithmetic on BatchReport."""

from pathlib import Path

from llmflow.batch.jsonl import summary_path_for
from llmflow.batch.report import failure_warning, merge_reports, outcome, tok_per_s
from llmflow.results import BatchReport
from tests.unit.batch.reports import batch_report


def test_tok_per_s_counts_only_this_pass(tmp_path: Path):
    report = batch_report(
        tmp_path,
        already_done=4,
        sent=6,
        succeeded=5,
        failed_http=1,
        prompt_tokens=100,
        completion_tokens=50,
        wall_s=2.0,
    )
    t = tok_per_s(report, summary_path_for(report.output_path))
    assert t.requests == 6 and t.requests_per_s == 3.0
    assert t.output_tok_per_s == 25.0 and t.total_tok_per_s == 75.0
    assert t.summary_path.name == "o.summary.json"


def test_merge_reports_sums_the_passes(tmp_path: Path):
    common = dict(input_path=tmp_path, output_path=tmp_path, errors_path=tmp_path, input_lines=100, invalid_lines=0)
    a = BatchReport(
        **common,
        already_done=10,
        sent=50,
        succeeded=40,
        failed_http=0,
        unfinished=10,
        prompt_tokens=400,
        completion_tokens=80,
        wall_s=5,
        retries=30,
        stopped_early=True,
    )
    b = BatchReport(
        **common,
        already_done=50,
        sent=50,
        succeeded=50,
        failed_http=0,
        unfinished=0,
        prompt_tokens=500,
        completion_tokens=100,
        wall_s=4,
        retries=0,
    )
    m = merge_reports(a, b)
    assert (m.already_done, m.sent, m.succeeded, m.unfinished, m.stopped_early) == (10, 100, 90, 0, False)
    assert (m.prompt_tokens, m.completion_tokens, m.wall_s, m.retries) == (900, 180, 9, 30)


def _report(tmp_path: Path, **counts) -> BatchReport:
    return batch_report(tmp_path, **counts)


def test_outcome_tells_finished_from_finished_with_failures_from_unfinished(tmp_path: Path):
    assert outcome(_report(tmp_path)) == "finished"
    assert outcome(_report(tmp_path, succeeded=9, failed_http=1, failed_statuses={500: 1})) == "finished with failures"
    assert outcome(_report(tmp_path, succeeded=9, sent=9, invalid_lines=1)) == "finished with failures"
    assert outcome(_report(tmp_path, succeeded=8, failed_http=1, unfinished=1)) == "unfinished"
    assert outcome(_report(tmp_path, stopped_early=True)) == "unfinished"


def test_failure_warning_says_most_failed_and_by_which_status(tmp_path: Path):
    assert failure_warning(_report(tmp_path)) is None
    few = failure_warning(_report(tmp_path, succeeded=9, failed_http=1, failed_statuses={500: 1}))
    assert few.startswith("1 of 10 answered requests were errors (HTTP 500 x1)")
    most = failure_warning(_report(tmp_path, succeeded=0, failed_http=10, failed_statuses={404: 10}))
    assert most.startswith("most requests failed: 10 of 10 answered requests were errors (HTTP 404 x10)")
    assert "--retry-errors" in most and "o.errors.jsonl" in most


def test_merge_reports_sums_failed_statuses(tmp_path: Path):
    a = _report(tmp_path, succeeded=8, failed_http=2, failed_statuses={404: 1, 500: 1})
    b = _report(tmp_path, succeeded=9, failed_http=1, failed_statuses={404: 1})
    assert merge_reports(a, b).failed_statuses == {404: 2, 500: 1}

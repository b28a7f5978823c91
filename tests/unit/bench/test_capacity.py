"""Capacity search without servers: the search against fake measurements, the table, the
campaign's planning of cells (and its resume), the CSV, markdown and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.campaign import _capacity_table, _plan
from llmflow.bench.capacity import CapacitySearch, capacity_table, cells_totals, holds, next_load, verdict
from llmflow.bench.capacity_report import capacity_markdown, write_capacity
from llmflow.bench.cells import CellBook
from llmflow.bench.config import CampaignConfig, cell_result, load_campaign
from llmflow.bench.report import output_names
from llmflow.config import PROJECT_ROOT
from llmflow.results import CellResult


def search_until(search: CapacitySearch, limit: float, why: str = "timed_out") -> tuple[list[float], dict]:
    """Run the search against a server that holds every load up to ``limit``."""
    held: dict[float, bool] = {}
    order = []
    while (load := next_load(search, held)) is not None:
        assert load not in held  # never measures a load twice
        order.append(load)
        held[load] = load <= limit
    return order, held


def test_bracket_multiplies_to_max_and_keeps_whole_concurrencies():
    assert CapacitySearch(start=1, max=64).bracket() == [1, 2, 4, 8, 16, 32, 64]
    assert CapacitySearch(start=1, max=40).bracket() == [1, 2, 4, 8, 16, 32, 40]
    assert CapacitySearch(start=1, factor=1.5, max=6).bracket() == [1, 2, 3, 4, 6]  # at least +1 each
    assert CapacitySearch(dimension="rate", start=0.5, factor=3, max=10).bracket() == [0.5, 1.5, 4.5, 10]
    assert CapacitySearch(start=8, max=8).bracket() == [8]


def test_config_is_checked():
    with pytest.raises(ValueError, match="at least start"):
        CapacitySearch(start=8, max=4)
    with pytest.raises(ValueError, match="whole numbers"):
        CapacitySearch(start=1.5, max=4)
    with pytest.raises(ValueError, match="greater than 1"):
        CapacitySearch(max=4, factor=1)
    c = CampaignConfig.model_validate({"capacity": {"max": 16}})
    assert c.capacity.dimension == "concurrency" and c.capacity.bisect_steps == 3
    with pytest.raises(ValueError, match="capacity.stat"):
        CampaignConfig.model_validate({"capacity": {"max": 16, "stat": 1}})


@pytest.mark.parametrize("limit", [1, 2, 5, 11, 12, 13, 20, 33, 47, 63])
def test_search_finds_the_limit_of_a_server_that_holds_up_to_it(limit):
    search = CapacitySearch(start=1, max=64, bisect_steps=5)
    order, held = search_until(search, limit)
    best = max(x for x, ok in held.items() if ok)
    first_bad = min(x for x, ok in held.items() if not ok)
    assert best == limit and first_bad == limit + 1  # exact: 5 steps bisect any doubling gap up to 32
    assert len(order) <= search.most_cells() == 7 + 5


def test_few_bisect_steps_narrow_the_gap_without_pinning_it():
    search = CapacitySearch(start=1, max=64, bisect_steps=2)
    order, held = search_until(search, 21)
    assert order == [1, 2, 4, 8, 16, 32, 24, 20]  # bracket to 32, then 24 (fails), 20 (holds)
    assert max(x for x, ok in held.items() if ok) == 20 and min(x for x, ok in held.items() if not ok) == 24


def test_a_server_that_fails_at_the_start_costs_one_cell_and_one_that_never_fails_the_bracket():
    search = CapacitySearch(start=2, max=32)
    assert search_until(search, 1)[0] == [2]
    assert search_until(search, 10**6)[0] == [2, 4, 8, 16, 32]


def test_rate_search_bisects_in_fractions():
    search = CapacitySearch(dimension="rate", start=1, max=16, bisect_steps=4)
    order, held = search_until(search, 5.3)
    assert order[:5] == [1, 2, 4, 8, 6.0]
    best = max(x for x, ok in held.items() if ok)
    assert 5.0 <= best <= 5.3


def test_a_load_that_did_not_run_stops_the_search():
    search = CapacitySearch(max=16)
    assert next_load(search, {1: True, 2: None}) is None
    assert next_load(search, {1: True, 2: True, 4: False, 3: None}) is None


def cell(ctx: int, conc: int, status: str = "ok", out: int = 8) -> CellResult:
    return CellResult(key=f"ctx{ctx}-c{conc}-out{out}", context=ctx, concurrency=conc, output_tokens=out, status=status)


def test_holds_and_verdict_point_at_the_slo_verdict_when_there_is_one():
    assert holds(cell(32, 1)) and verdict(cell(32, 1)) == "ok"
    assert not holds(cell(32, 1, "timed_out")) and verdict(cell(32, 1, "timed_out")) == "timed_out"
    assert holds(cell(32, 1, "not_run")) is None
    assert holds({"status": "ok", "summary": {"slo_met": True}})
    missed = {"status": "ok", "summary": {"slo_met": False}}
    assert not holds(missed) and verdict(missed) == "slo"
    assert verdict({"status": "saturated", "slo_met": False}) == "saturated"


def fake_server(limits: dict[int, int], why: dict[int, str]):
    """Per context, the highest concurrency that holds (0: none) and what happens above it."""

    def measure(c) -> CellResult:
        status = "ok" if c.concurrency <= limits[c.context] else why[c.context]
        return cell_result(c, status, requests=c.concurrency * 2, session=1)

    return measure


def run_search(campaign: CampaignConfig, book: CellBook, measure, stop_after: int | None = None) -> int:
    ran = 0
    while pending := _plan(campaign, book):
        if stop_after is not None and ran == stop_after:
            return ran
        book.record(measure(pending[0]))
        ran += 1
    return ran


def test_the_campaign_plans_a_search_per_context_and_writes_the_table(tmp_path: Path):
    campaign = CampaignConfig(
        name="cap",
        context_sizes=[32, 128, 512, 1024],
        output_tokens=[8],
        capacity={"start": 1, "factor": 2, "max": 32, "bisect_steps": 3},
        output_dir=tmp_path,
    )
    measure = fake_server(
        {32: 13, 128: 5, 512: 32, 1024: 0}, {32: "timed_out", 128: "crashed", 512: "-", 1024: "rejected"}
    )
    book = CellBook.open(campaign, [], tmp_path, lambda done, total: None)
    ran = run_search(campaign, book, measure)
    table = _capacity_table(campaign, book.ordered())
    got = {r["context"]: (r["held"], r["failed"], r["verdict"], r["cells"], r["done"]) for r in table}
    assert got == {
        32: (13, 14, "timed_out", 5 + 3, True),  # 1..16, then 12, 14, 13
        128: (5, 6, "crashed", 4 + 2, True),  # 1..8, then 6, 5: adjacent, done in 2
        512: (32, None, None, 6, True),  # held the max
        1024: (None, 1, "rejected", 1, True),  # failed at the start
    }
    assert table[2]["at_max"] and not table[0]["at_max"]
    assert ran == len(book.cells) == 21
    assert cells_totals(table) == (21, 11 * 4)  # a full grid over the 11 loads measured: 1..32, 12, 14, 13, 6, 5

    # resume: a new book over the same cells.jsonl, stopped after 10 cells, re-derives the search
    out2 = tmp_path / "again"
    out2.mkdir()
    first = CellBook.open(campaign.model_copy(update={"output_dir": out2}), [], out2, lambda d, t: None)
    assert run_search(campaign, first, measure, stop_after=10) == 10
    resumed = CellBook.open(campaign.model_copy(update={"resume": True}), [], out2, lambda d, t: None)
    assert len(resumed.results) == 10
    assert run_search(campaign, resumed, measure) == 11  # only the rest
    assert [c.key for c in resumed.cells] == [c.key for c in book.cells]


def test_a_rate_search_plans_open_loop_cells(tmp_path: Path):
    campaign = CampaignConfig(
        context_sizes=[32, 64],
        concurrencies=[16],
        capacity={"dimension": "rate", "start": 0.5, "max": 8, "bisect_steps": 2},
        output_dir=tmp_path,
    )
    limits = {32: 5.0, 64: 1.0}

    def measure(c) -> CellResult:
        assert c.concurrency == 16  # the cap on requests in flight
        return cell_result(c, "ok" if c.rate <= limits[c.context] else "saturated", session=1)

    book = CellBook.open(campaign, [], tmp_path, lambda done, total: None)
    run_search(campaign, book, measure)
    table = {r["context"]: r for r in _capacity_table(campaign, book.ordered())}
    assert [c.rate for c in book.cells if c.context == 32] == [0.5, 1, 2, 4, 8, 6, 5]
    assert (table[32]["held"], table[32]["failed"], table[32]["verdict"]) == (5, 6, "saturated")
    assert (table[64]["held"], table[64]["failed"]) == (1, 1.25)  # 2 failed; 1.5 and 1.25 too


def test_capacity_outputs(tmp_path: Path):
    search = CapacitySearch(start=1, max=8, bisect_steps=2)
    cells = [
        cell(32, 1),
        cell(32, 2),
        cell(32, 4),
        cell(32, 8, "timed_out"),
        cell(32, 6),
        cell(32, 7, "timed_out"),
        cell(64, 1),
        cell(64, 2, "rejected"),
        cell(256, 1, "skipped"),
    ]
    table = capacity_table(search, cells, [32, 64, 256], [8])
    paths = write_capacity(tmp_path, table, "test")
    csv = pd.read_csv(paths["capacity"], dtype=str)
    assert csv["held"].fillna("-").tolist() == ["6", "1", "-"]  # whole numbers, not 6.0
    assert csv["failed"].tolist() == ["7", "2", "1"] and csv["verdict"].tolist() == ["timed_out", "rejected", "skipped"]
    assert paths["capacity_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = capacity_markdown(table)
    assert "| 32 | 8 | 6 | 7 | timed_out | 6 |" in md
    assert "ran 9 cells; a full grid over the same concurrency values would need 18" in md  # loads 1,2,4,6,7,8
    (tmp_path / "summary.json").write_text(json.dumps({"capacity": table}))
    assert output_names(tmp_path)[:2] == ["summary.json", "capacity.csv"]


def test_capacity_figure_marks_the_held_load_and_the_failure_with_its_verdict():
    from llmflow.bench.capacity_report import capacity_figure

    table = capacity_table(
        CapacitySearch(start=1, max=8),
        [cell(32, 1), cell(32, 2), cell(32, 4, "timed_out"), cell(64, 1, "rejected")],
        [32, 64],
        [8],
    )
    ax = capacity_figure(table, "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64"]
    held = [line for line in ax.get_lines() if line.get_gid() == "held:8"][0]
    assert list(held.get_xdata()) == [32] and list(held.get_ydata()) == [2.0]
    failed = {line.get_gid(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()}
    assert failed["failed:timed_out"] == (32, 4.0) and failed["failed:rejected"] == (64, 1.0)


def test_the_capacity_campaign_file_validates():
    campaign, session = load_campaign(PROJECT_ROOT / "benchmarks" / "campaigns" / "tiny-capacity.toml")
    assert campaign.capacity is not None and session is not None

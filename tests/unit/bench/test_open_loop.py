"""Open-loop cells: the arrival schedule, latency from the scheduled time, the saturation rule,
SLOs and goodput, and the open-loop client against a small real server with a fixed capacity."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web
from pydantic import ValidationError

from llmflow.bench.config import CampaignConfig, Cell, grid, skip_reason
from llmflow.bench.metrics import (
    CELL_METRICS,
    SLO,
    RequestTiming,
    Saturation,
    cell_status,
    cell_summary,
    goodput,
    request_metrics,
    saturation_reason,
    slo_met,
)
from llmflow.bench.stream import StreamRequest, arrival_schedule, run_open_loop
from llmflow.results import CellResult
from tests.conftest import serve_aiohttp


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff([0.0, *times])


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_schedule_has_mean_gap_one_over_rate(rate):
    times = arrival_schedule(2000, rate, seed=1)
    assert times == sorted(times) and times[0] > 0
    assert np.mean(_gaps(times)) == pytest.approx(1 / rate)  # scaled so the last is due at n/rate
    assert times[-1] == pytest.approx(2000 / rate)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_are_gamma_with_shape_burstiness(burstiness):
    gaps = _gaps(arrival_schedule(20000, 2.0, burstiness=burstiness, seed=7))
    # a gamma with shape k has coefficient of variation 1/sqrt(k): 1 for Poisson (exponential)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    # and its shape by the method of moments
    assert np.mean(gaps) ** 2 / np.var(gaps) == pytest.approx(burstiness, rel=0.1)


def test_schedule_is_reproducible_by_seed_and_constant_mode_is_even():
    assert arrival_schedule(50, 3.0, seed=(5, 0)) == arrival_schedule(50, 3.0, seed=(5, 0))
    assert arrival_schedule(50, 3.0, seed=(5, 0)) != arrival_schedule(50, 3.0, seed=(5, 1))
    assert arrival_schedule(4, 2.0, arrival="constant") == [0.5, 1.0, 1.5, 2.0]
    assert arrival_schedule(0, 2.0) == []


def _counts(due_per_window: list[int], done_per_window: list[int]) -> list[tuple[int, int]]:
    """Cumulative (due, finished) counts from per-window arrivals and completions."""
    return list(zip(np.cumsum(due_per_window).tolist(), np.cumsum(done_per_window).tolist()))


def test_saturation_rule_wants_answers_falling_behind_arrivals_and_a_backlog():
    rule = Saturation(window_s=1.0, windows=3, keep_up=0.8, min_backlog=8)
    overload = _counts([10, 10, 10, 10], [5, 5, 5, 5])  # answered half of what fell due
    reason = saturation_reason(overload, rule)
    assert reason and "15 of the 30 requests" in reason and "backlog 5 -> 10 -> 15 -> 20" in reason
    assert saturation_reason(overload[:3], rule) is None  # not yet windows + 1 counts
    assert saturation_reason(_counts([2, 2, 2, 2], [0, 1, 1, 1]), rule) is None  # behind, backlog under the floor
    # a server answering in batches keeps up over the windows, though not in every one
    assert saturation_reason(_counts([10, 10, 10, 10], [0, 20, 0, 20]), rule) is None
    # only the last windows count: a burst that was worked off is no saturation ...
    assert saturation_reason(_counts([40, 10, 10, 10, 10], [0, 10, 10, 10, 10]), rule) is None
    # ... and the schedule's end (nothing more falls due) is none either
    assert saturation_reason(_counts([10, 10, 0, 0, 0], [2, 2, 2, 2, 2]), rule) is None
    assert saturation_reason(overload, rule.model_copy(update={"windows": 0})) is None  # off
    assert saturation_reason(overload, rule.model_copy(update={"keep_up": 0.4})) is None


def _ok(ttft: float, e2el: float, tokens: int = 3, delay: float = 0.0) -> RequestTiming:
    times = list(np.linspace(ttft, e2el, tokens)) if tokens > 1 else [ttft]
    return RequestTiming(outcome="ok", chunk_times=times, completion_tokens=tokens, prompt_tokens=4, send_delay=delay)


def test_latency_counts_from_the_scheduled_time():
    m = request_metrics(_ok(0.1, 0.5, tokens=5, delay=0.2))
    assert m["ttft"] == pytest.approx(0.3) and m["e2el"] == pytest.approx(0.7)
    assert m["tpot"] == pytest.approx(0.1)  # the delay is before the first token: TPOT and ITL unchanged
    assert m["itl"] == pytest.approx([0.1] * 4)


def test_goodput_counts_requests_that_met_every_slo():
    slo = SLO(ttft_ms=200, e2el_ms=1000)
    timings = [_ok(0.1, 0.5), _ok(0.3, 0.5), _ok(0.1, 1.2), _ok(0.05, 0.1, delay=0.2)]
    per = [request_metrics(t) for t in timings]
    assert goodput(per, slo, 2.0) == pytest.approx(1 / 2.0)  # only the first: ttft, e2el, ttft+delay too late
    assert goodput(per, None, 2.0) is None
    # one output token: no TPOT, counted as 0 (vllm bench serve --goodput)
    one = [request_metrics(_ok(0.1, 0.1, tokens=1))]
    assert goodput(one, SLO(tpot_ms=1), 1.0) == 1.0


def test_slo_met_holds_the_percentile_to_each_limit_and_wants_every_request_ok():
    fast = [_ok(0.1, 0.5) for _ in range(98)]
    slow = [_ok(2.0, 3.0), _ok(2.0, 3.0)]
    assert slo_met(fast, SLO(ttft_ms=150, e2el_ms=600)) is True
    assert slo_met([*fast, *slow], SLO(ttft_ms=150, percentile=99)) is False  # p99 of 100 sees the 2 slow
    assert slo_met([*fast, *slow], SLO(ttft_ms=150, percentile=50)) is True
    assert slo_met([*fast, RequestTiming(outcome="timed_out")], SLO(ttft_ms=150, percentile=50)) is False
    assert slo_met(fast, SLO(tpot_ms=1)) is False
    assert slo_met(fast, None) is None
    assert slo_met([], SLO(ttft_ms=1)) is False


def test_summary_has_send_delay_goodput_and_counts_cancelled_apart():
    timings = [
        _ok(0.1, 0.5, delay=0.0),
        _ok(0.1, 0.5, delay=0.1),
        RequestTiming(outcome="cancelled", send_delay=5.0, end_s=1.0),
        RequestTiming(outcome="cancelled"),
    ]
    s = cell_summary(timings, 2.0, SLO(ttft_ms=150))
    assert s.completed == 2 and s.failed == 0 and s.cancelled == 2
    # over the requests sent: the one cut off in flight counts, the one never sent does not
    assert s.mean_send_delay_ms == pytest.approx(1700.0)
    assert s.p99_send_delay_ms == pytest.approx(np.percentile([0.0, 100.0, 5000.0], 99))
    assert s.request_goodput == pytest.approx(0.5)  # the delayed one's TTFT is 200 ms from its schedule
    assert s.slo_met is False  # cancelled requests are not ok
    assert cell_summary(timings[:1], 1.0).request_goodput is None and cell_summary(timings[:1], 1.0).slo_met is None
    assert cell_status(s, saturated=True) == "saturated"
    assert cell_status(s.model_copy(update={"crashed": 1}), saturated=True) == "crashed"
    names = {m.name for m in CELL_METRICS}
    assert {"mean_send_delay_ms", "p99_send_delay_ms", "request_goodput", "slo_met", "cancelled"} <= names


def test_rates_make_open_loop_cells_and_closed_loop_keys_stay():
    closed = CampaignConfig(context_sizes=[32], concurrencies=[4], output_tokens=[8])
    assert [c.key for c in grid(closed)] == ["ctx32-c4-out8"]
    opened = CampaignConfig(context_sizes=[32, 64], concurrencies=[16], output_tokens=[8], rates=[8, 0.5, 2])
    cells = grid(opened)
    assert [c.key for c in cells][:3] == ["ctx32-r0.5-c16-out8", "ctx64-r0.5-c16-out8", "ctx32-r2-c16-out8"]
    assert {c.rate for c in cells} == {0.5, 2.0, 8.0}
    with pytest.raises(ValidationError):
        CampaignConfig(rates=[0])
    with pytest.raises(ValidationError):
        CampaignConfig(rates=[1, 1])
    with pytest.raises(ValidationError):
        CampaignConfig(slo={"ttft_ms": 100, "itl_ms": 3})
    assert CampaignConfig(slo={"ttft_ms": 100}).slo.percentile == 99
    # a rejected context spares larger ones at the same rate only
    done = [CellResult(key="k", context=32, concurrency=16, output_tokens=8, rate=0.5, status="rejected")]
    assert skip_reason(Cell(context=64, concurrency=16, output_tokens=8, rate=0.5), done, ["rejected"])
    assert skip_reason(Cell(context=64, concurrency=16, output_tokens=8, rate=2.0), done, ["rejected"]) is None
    # a saturated rate spares the higher rates at the same context, unless told to run them
    done = [CellResult(key="k", context=32, concurrency=16, output_tokens=8, rate=2.0, status="saturated")]
    higher = Cell(context=32, concurrency=16, output_tokens=8, rate=8.0)
    assert skip_reason(higher, done, ["rejected"]) == "rate 2/s was saturated"
    assert skip_reason(higher, done, ["rejected"], skip_higher_rates=False) is None
    assert skip_reason(Cell(context=32, concurrency=16, output_tokens=8, rate=0.5), done, ["rejected"]) is None
    assert skip_reason(Cell(context=64, concurrency=16, output_tokens=8, rate=8.0), done, ["rejected"]) is None


SERVICE_S = 0.05  # one request at a time, 50 ms each: 20 requests/s at most


def _capped_server():
    busy = asyncio.Lock()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async with busy:
            await asyncio.sleep(SERVICE_S)
            for text in ("a", "b"):
                await resp.write(b"data: " + json.dumps({"choices": [{"text": text, "finish_reason": None}]}).encode())
                await resp.write(b"\n\n")
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    return handler


def _open_loop(rate: float, n: int, cap: int, rule: Saturation | None):
    async def go():
        runner, url = await serve_aiohttp(_capped_server())
        reqs = [StreamRequest(str(i), json.dumps({"prompt": "x"}).encode(), 4, 2) for i in range(n)]
        seen = []
        try:
            run = await run_open_loop(
                url,
                None,
                reqs,
                arrival_schedule(n, rate, arrival="constant"),
                cap,
                5.0,
                rule,
                on_done=lambda i, due, sent, t: seen.append((i, due, sent, t.outcome)),
            )
        finally:
            await runner.cleanup()
        return run, seen

    return asyncio.run(go())


def test_open_loop_below_capacity_sends_on_time():
    run, seen = _open_loop(rate=5.0, n=6, cap=8, rule=Saturation(window_s=0.1, windows=3, min_backlog=4))
    assert run.saturated is None and len(seen) == 6
    assert [t.outcome for _, _, t in run.results] == ["ok"] * 6
    for due, sent, t in run.results:
        assert due == pytest.approx(sent, abs=0.05) and t.send_delay < 0.05
        assert request_metrics(t)["e2el"] >= SERVICE_S
    assert run.wall >= 6 / 5.0


def test_open_loop_far_above_capacity_stops_saturated_and_cancels_the_rest():
    rule = Saturation(window_s=0.1, windows=3, min_backlog=10)
    run, seen = _open_loop(rate=200.0, n=600, cap=600, rule=rule)  # 3 s of schedule, 20 req/s served
    assert run.saturated and "saturated" in run.saturated
    # stopped well before the schedule's 3 s (and the 30 s it would take); ~0.4 s on an idle machine
    assert run.wall < 2.0
    outcomes = [t.outcome for _, _, t in run.results]
    assert len(run.results) == 600 and len(seen) == 600  # every scheduled request has a row
    assert 0 < outcomes.count("ok") < 45 and outcomes.count("cancelled") == 600 - outcomes.count("ok")
    in_flight = [(due, sent) for due, sent, t in run.results if t.outcome == "cancelled" and sent is not None]
    assert in_flight, "requests sent and cut off"
    assert any(sent is None for _, sent, t in run.results)  # and ones never sent
    summary = cell_summary([t for _, _, t in run.results], run.wall)
    assert summary.cancelled == 600 - summary.completed and summary.failed == 0


def test_open_loop_cap_delays_sends_and_latency_counts_the_delay():
    run, _ = _open_loop(rate=100.0, n=6, cap=1, rule=None)  # all due within 60 ms, served one by one
    delays = [t.send_delay for _, _, t in run.results]
    assert delays[-1] > 4 * SERVICE_S * 0.8 and delays == sorted(delays)
    last = request_metrics(run.results[-1][2])
    assert last["e2el"] >= delays[-1] + SERVICE_S * 0.9


def test_report_and_plot_show_rates_saturated_cells_and_the_slo_verdict(tmp_path):
    from llmflow.bench.report import campaign_figure, cells_frame, cells_table, markdown_report

    def cell(ctx: int, rate: float | None, status: str = "ok") -> CellResult:
        key = Cell(context=ctx, concurrency=16, output_tokens=8, rate=rate).key
        summary = {"completed": 4, "output_throughput": 10.0, "mean_ttft_ms": 5.0, "slo_met": status == "ok"}
        return CellResult(
            key=key, context=ctx, concurrency=16, output_tokens=8, rate=rate, status=status, requests=4, summary=summary
        )

    cells = [cell(32, 1.0), cell(64, 1.0), cell(32, 50.0, "saturated"), cell(64, 50.0, "saturated")]
    fig = campaign_figure(cells_frame(cells), "t")
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"1 req/s (cap 16)", "50 req/s (cap 16)", "saturated"} <= legend
    drawn = [ln for ln in fig.get_axes()[0].get_lines() if ln.get_gid() == "status:saturated"]
    assert drawn and drawn[0].get_marker() == "^"
    table = cells_table(cells)
    assert list(table["rate"]) == [1.0, 1.0, 50.0, 50.0] and list(table["slo_met"]) == [True, True, False, False]
    report = markdown_report({"name": "t"}, cells, [], {})
    assert "| ctx32-r50-c16-out8 | saturated |" in report and "| slo_met |" in report
    assert "yes" in report and "no" in report
    # closed-loop cells keep their plain label
    closed = CellResult(key="ctx32-c4-out8", context=32, concurrency=4, output_tokens=8, status="ok", requests=1)
    legend = {t.get_text() for t in campaign_figure(cells_frame([closed]), "t").legends[0].get_texts()}
    assert "concurrency 4" in legend


def test_request_rows_carry_schedule_send_delay_and_wall_clock():
    from tasks.benchmark import request_row

    cell = Cell(context=32, concurrency=16, output_tokens=3, rate=4.0)
    t = _ok(0.1, 0.3, delay=0.25).model_copy(update={"end_s": 0.3})
    row = request_row(cell, 0, 7, False, 1.25, t, scheduled_s=1.0, ended_at=100.0)
    assert (row["cell"], row["rate"], row["scheduled_s"], row["start_s"]) == ("ctx32-r4-c16-out3", 4.0, 1.0, 1.25)
    assert row["send_delay_s"] == 0.25 and row["sent_at"] == pytest.approx(99.7) and row["ended_at"] == 100.0
    assert row["ttft_s"] == pytest.approx(0.35) and row["e2el_s"] == pytest.approx(0.55)  # from the schedule
    closed = request_row(Cell(context=32, concurrency=2, output_tokens=3), -1, 0, True, 0.5, _ok(0.1, 0.3))
    assert closed["rate"] is None and closed["scheduled_s"] == 0.5 and closed["send_delay_s"] == 0.0
    never = request_row(cell, 0, 8, False, None, RequestTiming(outcome="cancelled"), scheduled_s=3.0)
    assert never["start_s"] is None and never["sent_at"] is None and never["scheduled_s"] == 3.0

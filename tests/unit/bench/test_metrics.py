"""Campaign arithmetic against hand-computed values (vllm bench serve's definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from llmflow.bench.metrics import RequestTiming, cell_status, cell_summary, classify, request_metrics


def _ok(times: list[float], prompt: int = 100, out: int | None = None, **kw) -> RequestTiming:
    return RequestTiming(
        outcome="ok",
        status_code=200,
        chunk_times=times,
        prompt_tokens=prompt,
        completion_tokens=len(times) if out is None else out,
        **kw,
    )


def test_request_metrics_follow_the_definitions():
    m = request_metrics(_ok([0.5, 0.6, 0.8, 1.1]))
    assert m["ttft"] == 0.5 and m["e2el"] == 1.1
    assert m["tpot"] == pytest.approx((1.1 - 0.5) / 3)
    assert m["itl"] == pytest.approx([0.1, 0.2, 0.3])
    assert request_metrics(_ok([0.4]))["tpot"] is None  # one token: no TPOT
    assert request_metrics(RequestTiming(outcome="rejected", status_code=400))["ttft"] is None


def test_cell_summary_keys_values_and_mismatches():
    timings = [
        _ok([0.5, 0.6, 0.8, 1.1], prompt=100, requested_output_tokens=4, requested_prompt_tokens=100),
        _ok([0.3, 0.5, 0.7, 0.9], prompt=100, requested_output_tokens=4, requested_prompt_tokens=100),
        _ok([0.2, 0.4], prompt=90, requested_output_tokens=4, requested_prompt_tokens=100),  # short on both
        RequestTiming(outcome="rejected", status_code=400, error="context length exceeded"),
    ]
    s = cell_summary(timings, duration_s=2.0)
    assert (s.completed, s.failed, s.rejected, s.crashed) == (3, 1, 1, 0)
    assert s.total_input_tokens == 290 and s.total_output_tokens == 10
    assert s.request_throughput == 1.5 and s.output_throughput == 5.0 and s.total_token_throughput == 150.0
    assert s.mean_in_flight == pytest.approx((1.1 + 0.9 + 0.4) / 2.0)  # the load the server really saw
    assert s.mean_ttft_ms == pytest.approx(1000 * (0.5 + 0.3 + 0.2) / 3)
    assert s.p99_ttft_ms == pytest.approx(float(np.percentile([500.0, 300.0, 200.0], 99)))
    tpots = [(1.1 - 0.5) / 3, (0.9 - 0.3) / 3, 0.2]
    assert s.median_tpot_ms == pytest.approx(1000 * float(np.median(tpots)))
    assert s.mean_itl_ms == pytest.approx(1000 * float(np.mean([0.1, 0.2, 0.3, 0.2, 0.2, 0.2, 0.2])))
    assert s.prefill_tok_per_s == pytest.approx((100 + 100 + 90) / (0.5 + 0.3 + 0.2))
    assert s.decode_tok_per_s == pytest.approx((3 + 3 + 1) / ((1.1 - 0.5) + (0.9 - 0.3) + (0.4 - 0.2)))
    assert s.length_mismatches == 1
    assert cell_status(s) == "rejected"


def test_empty_and_failed_cells():
    s = cell_summary([RequestTiming(outcome="crashed", error="connection reset")], duration_s=1.0)
    assert s.completed == 0 and s.mean_ttft_ms is None and s.p90_e2el_ms is None
    assert cell_status(s) == "crashed"
    assert cell_status(cell_summary([_ok([0.1, 0.2])], 1.0)) == "ok"


def test_classify():
    assert classify(200) == "ok"
    assert classify(400) == "rejected" and classify(413) == "rejected"
    assert classify(500) == "crashed" and classify(None, ConnectionResetError()) == "crashed"
    assert classify(None, timed_out=True) == "timed_out"
    assert classify(200, RuntimeError("stream cut")) == "crashed"


def test_client_cpu_is_a_figure_of_the_cell_not_a_regression():
    from llmflow.bench.metrics import METRICS

    s = cell_summary([_ok([0.1, 0.2])], 2.0, client_cpu_s=0.5)
    assert s.client_cpu_s == 0.5 and s.client_cpu_share == 0.25
    assert cell_summary([_ok([0.1, 0.2])], 2.0).client_cpu_share is None  # not measured
    assert cell_summary([], 0.0, client_cpu_s=0.1).client_cpu_share is None
    assert not METRICS["client_cpu_s"].regression and not METRICS["client_cpu_share"].regression
    assert METRICS["client_cpu_share"].column

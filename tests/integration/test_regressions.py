"""Regressions that know noise, against real servers (llmflow/bench/compare.py).

A/A: identical runs of a small llama-cpp-python campaign, each compared with the one before,
flag nothing (the plain 10% rule flagged dozens of figures between such runs). A/B: the same
campaign against a server whose decoding is 25% slower (tests/integration/delay_server.py as
the ``command`` engine) flags the decode-side figures in every cell and no prefill-side one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flows.campaign import benchmark_campaign
from llmflow.bench.config import CampaignConfig
from llmflow.bench.report import compare as threshold_rule
from llmflow.config import CommandEngine, LlamaCppEngine, ModelConfig, SessionConfig
from tests.conftest import llama_processes

pytestmark = pytest.mark.integration

DELAY_SERVER = Path(__file__).with_name("delay_server.py")
DECODE_SIDE = {"mean_tpot_ms", "p99_itl_ms", "decode_tok_per_s", "output_throughput", "request_throughput"}
PREFILL_SIDE = {"mean_ttft_ms", "p99_ttft_ms", "prefill_tok_per_s"}


def _campaign(name: str, out: Path, baseline: Path | None, **grid) -> CampaignConfig:
    """Small cells with evidence: 20 requests at concurrency 1, 80 at 4 (``rounds`` 20), after 2 warm-ups."""
    return CampaignConfig(
        name=name,
        **{"context_sizes": [16, 32], "concurrencies": [1, 4], "output_tokens": [12], "rounds": 20, **grid},
        warmup_requests=2,
        output_dir=out,
        baseline=baseline,
        compare_to_last=False,
    )


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _delay_session(tmp_path: Path, token_ms: float) -> SessionConfig:
    engine = CommandEngine(argv=[sys.executable, str(DELAY_SERVER), "{host}", "{port}", "10", str(token_ms)])
    return SessionConfig(engine=engine, model=ModelConfig(path=DELAY_SERVER), runs_dir=tmp_path / "runs")


def test_a_server_25_percent_slower_to_decode_is_flagged_on_the_decode_side_only(prefect_api_url, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    # 40 requests at concurrency 1: a busy shared machine stalls a sleeping server now and then
    benchmark_campaign(session=_delay_session(tmp_path, 15.0), campaign=_campaign("it-ab", a, None, rounds=40))
    result = benchmark_campaign(
        session=_delay_session(tmp_path, 18.75), campaign=_campaign("it-ab", b, a / "summary.json", rounds=40)
    )
    assert all(c.status == "ok" for c in result.cells), [(c.key, c.status, c.reason) for c in result.cells]
    flagged: dict[str, set[str]] = {}
    for r in result.regressions:
        flagged.setdefault(r["key"], set()).add(r["metric"])
    print("A/B flagged:", {k: sorted(v) for k, v in sorted(flagged.items())})
    assert set(flagged) == {c.key for c in result.cells}
    for key, metrics in flagged.items():
        assert {"mean_tpot_ms", "decode_tok_per_s", "output_throughput"} <= metrics, key
        assert metrics <= DECODE_SIDE and not metrics & PREFILL_SIDE, key
    summary = _summary(b)
    assert summary["meta"]["comparison"]["method"] == "bootstrap"
    assert summary["meta"]["comparison"]["baseline_has_requests"] is True
    for r in summary["regressions"]:
        assert r["method"] == "bootstrap" and r["confidence"] == 0.99 and r["n_baseline"] >= 40
        assert r["ci_low"] <= r["change"] <= r["ci_high"]
    tpot = next(r for r in summary["regressions"] if r["metric"] == "mean_tpot_ms")
    assert 0.15 < tpot["change"] < 0.35
    assert not llama_processes(str(tmp_path / "runs"))


def test_identical_runs_of_a_small_llama_cpp_campaign_flag_nothing(server_env, prefect_api_url, tmp_path: Path):
    venv, model = server_env
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256), model=ModelConfig(path=model), runs_dir=tmp_path / "runs"
    )
    previous: Path | None = None
    naive: list[int] = []
    for i in range(5):
        out = tmp_path / f"run{i}"
        campaign = _campaign("it-aa", out, previous / "summary.json" if previous else None, context_sizes=[32, 128])
        campaign = campaign.model_copy(update={"output_tokens": [8]})
        result = benchmark_campaign(session=session, campaign=campaign)
        assert all(c.status == "ok" for c in result.cells), [(c.key, c.status, c.reason) for c in result.cells]
        if previous is not None:
            judged = _summary(out)["meta"]["comparison"]
            assert judged["figures_bootstrap"] > 0
            naive.append(len(threshold_rule(_summary(out)["cells"], _summary(previous)["cells"], 0.10)))
            print(f"A/A run {i} vs {i - 1}: {result.regressions or 'no regression'}; plain 10% rule: {naive[-1]}")
            assert result.regressions == [], result.regressions
        previous = out
    print(f"A/A: 0 of 4 comparisons flagged; the plain 10% rule flagged {naive} figures")
    assert not llama_processes(str(tmp_path / "runs"))

"""Campaigns against servers the session knows little about, and the deep gate, on a real
llama-cpp-python server (issue 14)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
import pytest
from prefect import flow
from pydantic import SecretStr

from flows.campaign import benchmark_campaign
from flows.session import model_session
from llmflow.bench.config import CampaignConfig
from llmflow.bench.prompts import PromptFactory
from llmflow.config import (
    CommandEngine,
    EndpointPlacement,
    GateConfig,
    LlamaCppEngine,
    LlamaServerEngine,
    ModelConfig,
    SessionConfig,
)
from tests.conftest import llama_processes

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("server", "fixed_length", "route"),
    [
        ("llama_cpp", ["min_tokens"], ("/extras/tokenize", "input")),  # after two 404s
        ("llama_server", ["ignore_eos"], ("/tokenize", "content")),  # after vLLM's body got no tokens
    ],
)
def test_a_campaign_on_an_endpoint_of_unknown_kind_gets_exact_prompts(
    server, fixed_length, route, session_config, request, tmp_path: Path
):
    """The endpoint's engine is declared ``command`` (nothing known about its tokenize API):
    the campaign asks the server which route it has and every cell is ok with exact lengths."""
    if server == "llama_server":
        binary = request.getfixturevalue("llama_server_bin")
        session_config = session_config.model_copy(update={"engine": LlamaServerEngine(binary=binary)})

    @flow
    def outer():
        with model_session(session_config) as s:
            theirs = SessionConfig(
                placement=EndpointPlacement(base_url=s.tunnel.base_url, api_key=SecretStr(s.handle.api_key())),
                engine=CommandEngine(argv=["true", "{port}"], fixed_length=fixed_length),
                model=session_config.model,
                runs_dir=tmp_path / "endpoint-runs",
            )
            with httpx.Client(base_url=s.tunnel.base_url, headers=s.handle.auth_headers()) as client:
                factory = PromptFactory(client, theirs.engine, s.handle.served_name)
            path, body = factory.route("x", "m")  # type: ignore[misc]
            campaign = CampaignConfig(
                name=f"it-any-endpoint-{server}",
                context_sizes=[32, 100],
                concurrencies=[1, 2],
                output_tokens=[8],
                rounds=2,
                output_dir=tmp_path / "out",
            )
            return (path, next(iter(body))), factory.tried, benchmark_campaign(session=theirs, campaign=campaign)

    found, tried, result = outer()
    assert found == route, tried
    assert [(c.key, c.status) for c in result.cells] == [(c.key, "ok") for c in result.cells], [
        (c.key, c.status, c.reason) for c in result.cells
    ]
    rows = pd.read_parquet(tmp_path / "out" / "requests.parquet")
    timed = rows[~rows["warmup"]]
    assert len(timed) == sum(c.requests for c in result.cells) == 2 * (1 + 2) * 2
    assert (timed["prompt_tokens"] == timed["context"]).all()  # exact prompt lengths
    assert (timed["completion_tokens"] == 8).all()


def test_the_deep_gate_stops_a_campaign_past_the_server_s_context_before_any_cell(
    server_env, prefect_api_url, tmp_path: Path
):
    """n_ctx 256 answers the gate's "ping"; the deep gate ("auto": the campaign's largest
    context, 512) fails the run naming the size, and no cell or request runs."""
    venv, model = server_env
    session = SessionConfig(
        engine=LlamaCppEngine(venv=venv, n_ctx=256),
        model=ModelConfig(path=model),
        gate=GateConfig(deep_context="auto"),
        runs_dir=tmp_path / "runs",
    )
    campaign = CampaignConfig(
        name="it-deep-gate",
        context_sizes=[32, 512],
        concurrencies=[1],
        output_tokens=[8],
        rounds=1,
        output_dir=tmp_path / "out",
    )
    state = benchmark_campaign(session=session, campaign=campaign, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as exc:
        state.result()
    message = str(exc.value)
    assert "deep gate (gate.deep_context = 512): the server answers short prompts but not a 512-token prompt" in (
        message
    ), message
    assert "HTTP 400" in message
    out = tmp_path / "out"
    assert not (out / "cells.jsonl").exists() and not (out / "requests.jsonl").exists()  # nothing else ran
    assert not llama_processes(str(tmp_path / "runs"))

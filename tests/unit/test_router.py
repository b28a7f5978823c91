"""llama-server's router as data: its model list, its state-change events, its log."""

from __future__ import annotations

from llmflow.config import LlamaCppEngine, LlamaRouter, LlamaServerEngine
from llmflow.router import LoadCounts, count_cycles, is_router, log_counts, parse_event, parse_models, swapped_out

# What the router answered to GET /v1/models (trimmed) and printed on /models/sse and in its log.
MODELS = {
    "data": [
        {"id": "alpha", "object": "model", "status": {"value": "loaded", "args": ["llama-server"]}},
        {"id": "beta", "object": "model", "status": {"value": "unloaded", "failed": True, "exit_code": 1}},
        {"id": "gamma", "object": "model"},
    ],
    "object": "list",
}


def test_model_list_states_and_a_single_model_servers_list():
    states = parse_models(MODELS)
    assert [(s.model, s.status, s.failed, s.exit_code) for s in states] == [
        ("alpha", "loaded", False, None),
        ("beta", "unloaded", True, 1),
        ("gamma", "loaded", False, None),  # no status: a one-model server, loaded
    ]
    assert parse_models({"error": "x"}) == [] and parse_models([1, 2]) == []


def test_events_from_the_stream():
    line = 'data: {"model":"beta","event":"status_change","data":{"status":"unloaded","exit_code":0}}'
    event = parse_event(line, at_s=1.5)
    assert (event.model, event.status, event.exit_code, event.at_s) == ("beta", "unloaded", 0, 1.5)
    assert parse_event('data: {"model":"beta","event":"model_status","data":{"status":"loading"}}').status == "loading"
    assert parse_event("") is None and parse_event("data: not json") is None
    assert parse_event('data: {"model":"*","event":"models_reload"}') is None


def _events(*pairs: tuple[str, str], exit_code: int | None = 0):
    return [
        parse_event(
            f'data: {{"model":"{m}","event":"status_change","data":{{"status":"{s}","exit_code":{exit_code}}}}}',
            at_s=float(i),
        )
        for i, (m, s) in enumerate(pairs)
    ]


def test_loads_and_evictions_counted_from_state_changes():
    events = _events(
        ("alpha", "loading"), ("alpha", "loading"), ("alpha", "loaded"),  # progress ticks repeat 'loading'
        ("beta", "loading"), ("beta", "loaded"),
        ("alpha", "unloaded"), ("gamma", "loading"), ("gamma", "loaded"),
        ("beta", "unloaded"), ("alpha", "loading"), ("alpha", "loaded"),
    )  # fmt: skip
    counts = count_cycles(events)
    assert {m: (c.loads, c.evictions, c.failed_loads) for m, c in counts.items()} == {
        "alpha": (2, 1, 0),
        "beta": (1, 1, 0),
        "gamma": (1, 0, 0),
    }
    assert counts["alpha"].timed_loads == 2 and counts["alpha"].load_s == (2 - 0) + (10 - 9)
    assert counts["alpha"].load_s_mean == 1.5 and LoadCounts().load_s_mean is None


def test_a_load_that_fails_is_not_an_eviction_and_an_early_unload_is():
    failed = count_cycles(_events(("beta", "loading"), ("beta", "unloaded"), exit_code=1))
    assert (failed["beta"].loads, failed["beta"].evictions, failed["beta"].failed_loads) == (0, 0, 1)
    # loaded before the listener subscribed: its unload is still an eviction
    early = count_cycles(_events(("alpha", "unloaded")))
    assert early["alpha"].evictions == 1


def test_an_eviction_the_router_had_to_force_is_still_an_eviction():
    """A loaded child that ignores the stop command is killed after the stop timeout and exits 1
    (seen in CI: two requests were proxied to a model the router had just picked for eviction)."""
    forced = count_cycles(_events(("gamma", "loading"), ("gamma", "loaded"), ("gamma", "unloaded"), exit_code=1))
    assert (forced["gamma"].evictions, forced["gamma"].forced_evictions, forced["gamma"].failed_loads) == (1, 1, 0)
    clean = count_cycles(_events(("gamma", "loaded"), ("gamma", "unloaded")))
    assert (clean["gamma"].evictions, clean["gamma"].forced_evictions) == (1, 0)


ROUTER_LOG = """\
0.04.666.011 I srv          load: spawning server instance with name=alpha on port 56951
[56951] 0.00.015.847 I srv  llama_server: model loaded
0.04.703.172 I srv          load: spawning server instance with name=beta on port 53773
0.05.868.316 I srv          tick: evicting idle LRU name=alpha for a queued request
[53773] 0.00.412.706 I srv  spawning server instance with name=ghost on port 1
0.05.920.839 I srv          load: spawning server instance with name=gamma on port 54915
0.06.000.000 I srv  load: models_max limit reached, removing LRU name=beta
0.06.016.694 I srv          load: spawning server instance with name=alpha on port 47205
"""


def test_the_router_log_read_as_loads_and_evictions():
    counts = log_counts(ROUTER_LOG)
    assert {m: (c.loads, c.evictions) for m, c in counts.items()} == {
        "alpha": (2, 1),
        "beta": (1, 1),
        "gamma": (1, 0),
    }  # a child's line ([port] ...) is never the router's


def test_a_swap_race_is_not_the_lines_answer_but_an_unknown_model_is():
    assert swapped_out(400, {"error": {"code": 400, "message": "model name=beta is not running"}})
    assert not swapped_out(400, {"error": {"code": 400, "message": "model 'nope' not found"}})
    assert not swapped_out(500, {"error": {"message": "model name=beta is not running"}})
    assert not swapped_out(400, "model name=beta is not running")


def test_router_mode_is_the_llama_server_engine_with_router_set():
    assert is_router(LlamaServerEngine(router=LlamaRouter(models_max=1)))
    assert not is_router(LlamaServerEngine()) and not is_router(LlamaCppEngine())

"""The readiness probe's classification of one answer."""

from llmflow.readiness import classify


def test_gate_classification():
    assert classify(None) == "loading"
    assert classify(503) == "loading"
    assert classify(200) == "ready"
    assert classify(401) == "fatal"

from pathlib import Path

import pytest
from pydantic import ValidationError

from llmflow.config import BatchConfig, SessionConfig


def test_defaults_are_local_llama_cpp():
    cfg = SessionConfig()
    assert cfg.placement.kind == "local"
    assert cfg.engine.kind == "llama_cpp"


def test_kind_may_be_left_out_in_dicts():
    cfg = SessionConfig.model_validate({"engine": {"n_ctx": 4096}, "placement": {}})
    assert cfg.engine.n_ctx == 4096


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"engine": {"n_ctx": 1}}, "n_ctx"),
        ({"engine": {"kind": "nope"}}, "engine"),
        ({"placement": {"kind": "cloud"}}, "placement"),
        ({"gate": {"deadline_s": 0}}, "deadline_s"),
        ({"engine": {"ctx": 4096}}, "ctx"),  # typo: unknown keys are errors
        ({"replicas": 0}, "replicas"),
        ({"replicas": 2, "placement": {"kind": "endpoint", "base_url": "http://h:1"}}, "replicas"),
    ],
)
def test_invalid_session_values_name_the_field(data, field):
    with pytest.raises(ValidationError) as exc:
        SessionConfig.model_validate(data)
    assert field in str(exc.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeouts": {"read": -1}}, "timeouts.read"),
        ({"fixed_output_tokens": 0}, "fixed_output_tokens"),
    ],
)
def test_invalid_batch_values_name_the_field(data, field):
    with pytest.raises(ValidationError) as exc:
        BatchConfig.model_validate(data)
    assert field in str(exc.value)


def test_output_must_differ_from_input(tmp_path: Path):
    with pytest.raises(ValidationError, match="output_path must differ"):
        BatchConfig(input_path=tmp_path / "a.jsonl", output_path=tmp_path / "a.jsonl")

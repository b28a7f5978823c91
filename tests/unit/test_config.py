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


@pytest.mark.parametrize(
    "line",
    [
        "export HF_TOKEN=hf_abcdef",
        "module load cuda && export WANDB_API_KEY='0123abcd'",
        'DB_PASSWORD="hunter2" python prepare.py',
        "export MY_SECRET=s3cr3t",
    ],
)
def test_a_setup_line_with_a_literal_secret_is_refused_naming_the_field(line: str):
    with pytest.raises(ValidationError) as exc:
        SessionConfig.model_validate({"engine": {"kind": "vllm", "setup": ["export HF_HOME=/scratch/hf", line]}})
    text = str(exc.value)
    assert "engine.vllm.setup" in text and "setup[1] assigns a literal value to" in text and "secret_env" in text
    value = line.split("=", 1)[1].split()[0].strip("'\"")
    assert value not in text  # the error does not echo the token


@pytest.mark.parametrize(
    "line",
    [
        'export HF_TOKEN="$(cat ~/.cache/huggingface/token)"',
        "export HF_TOKEN=$MY_TOKEN",
        "export SSL_KEYFILE=/etc/ssl/private/server.key",
        "export HF_HOME=/scratch/hf",
        "export HF_TOKEN=",
    ],
)
def test_computed_values_paths_and_other_names_pass(line: str):
    assert SessionConfig.model_validate({"engine": {"setup": [line]}}).engine.setup == [line]


def test_secret_env_takes_exactly_one_source():
    ok = SessionConfig.model_validate(
        {"engine": {"secret_env": {"HF_TOKEN": {"prefect_secret": "hf"}, "OTHER": {"env": "MY_OTHER"}}}}
    )
    assert ok.engine.secret_env["HF_TOKEN"].prefect_secret == "hf"
    for bad in ({}, {"prefect_secret": "a", "env": "B"}):
        with pytest.raises(ValidationError, match=r"engine.llama_cpp.secret_env.HF_TOKEN[\s\S]*exactly one"):
            SessionConfig.model_validate({"engine": {"secret_env": {"HF_TOKEN": bad}}})
    with pytest.raises(ValidationError, match="not an environment variable name"):
        SessionConfig.model_validate({"engine": {"secret_env": {"HF-TOKEN": {"env": "X"}}}})

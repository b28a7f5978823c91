"""Config errors read in the user's terms: the path they wrote, no internal names, a "did you mean"."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmflow.config import BatchConfig, SessionConfig
from llmflow.validation import config_problems, short_message


def problems(model, data: dict, prefix: str = "session.") -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return config_problems(info.value, model, prefix)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"placement": {"kind": "slrum"}},
            "session.placement.kind: unknown kind 'slrum'; did you mean 'slurm'? (one of local, slurm, ssh, endpoint)",
        ),
        ({"engine": {"kind": "vlm"}}, "session.engine.kind: unknown kind 'vlm'; did you mean 'vllm'?"),
        ({"engine": {"n_ctxx": 512}}, "session.engine.n_ctxx: unknown key; did you mean 'n_ctx'?"),
        (
            {"placement": {"kind": "slurm", "slurm": {"partiton": "gpu"}}},
            "session.placement.slurm.partiton: unknown key; did you mean 'partition'?",
        ),
        ({"modle": {}}, "session.modle: unknown key; did you mean 'model'?"),
        (
            {"engine": {"secret_env": {"HF_TOKEN": {"prefect_secrt": "hf"}}}},
            "session.engine.secret_env.HF_TOKEN.prefect_secrt: unknown key; did you mean 'prefect_secret'?",
        ),
        ({"engine": {"setup": ["ok", 3]}}, "session.engine.setup[1]: Input should be a valid string"),
        ({"engine": {"kind": "vllm", "max_model_len": 3}}, "session.engine.max_model_len: Input should be greater"),
        ({"placement": "local"}, "session.placement: Input should be a valid dictionary"),
    ],
)
def test_each_problem_names_the_field_as_written(data, expected):
    (line,) = problems(SessionConfig, data)
    assert line.startswith(expected), line
    for internal in ("pick()", "instance of", "llama_cpp.", ".slurm.slurm", "<class"):
        assert internal not in line


def test_a_key_far_from_every_field_gets_no_guess():
    (line,) = problems(SessionConfig, {"zzzzzz": 1})
    assert line == "session.zzzzzz: unknown key"


def test_batch_fields_are_named_under_batch():
    (line,) = problems(BatchConfig, {"concurency": 4}, "batch.")
    assert line == "batch.concurency: unknown key; did you mean 'concurrency'?"


def test_a_long_list_of_problems_is_cut_to_fit_a_terminal():
    assert short_message(["a", "b", "c", "d"]) == "a\nb\n(and 2 more)"
    assert short_message(["a"]) == "a"


def test_a_validator_that_names_its_field_is_not_named_twice():
    (line,) = problems(BatchConfig, {"output_path": "out/{dat}.jsonl"}, "batch.")
    assert line.startswith("batch.output_path: unknown placeholder {dat}") and line.count("output_path") == 1
    (line,) = problems(SessionConfig, {"engine": {"setup": ["export HF_TOKEN=hf_abc"]}})
    assert line.startswith("session.engine.setup: setup[0] assigns a literal value") and "Value error" not in line

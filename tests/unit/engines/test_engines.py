from pathlib import Path

from llmflow import engines
from llmflow.config import LlamaCppEngine, ModelConfig
from llmflow.placements.local import launch_script


def test_api_key_goes_in_env_never_in_argv():
    spec = engines.spec_for(LlamaCppEngine()).launch(ModelConfig(), "127.0.0.1", "s3cret")
    assert "s3cret" not in " ".join(spec.argv)
    assert spec.env == {"API_KEY": "s3cret"}
    assert engines.PORT_PLACEHOLDER in spec.argv


def test_launch_script_quotes_paths_and_keeps_setup_lines():
    engine = LlamaCppEngine(venv=Path("/opt/my env"), setup=["module load cuda", "export HF_HOME=/scratch/hf"])
    spec = engines.spec_for(engine).launch(ModelConfig(path=Path("/m/a b.gguf")), "127.0.0.1", None)
    script = launch_script(spec, engines.spec_for(engine).server_python(), Path("/r/endpoint.json"), "127.0.0.1")
    lines = script.splitlines()
    assert lines[:3] == ["set -e", "module load cuda", "export HF_HOME=/scratch/hf"]
    assert "'/opt/my env/bin/python'" in lines[3] and "'/m/a b.gguf'" in lines[3]
    assert lines[3].startswith("exec ")


def test_fixed_length_uses_min_tokens():
    assert engines.spec_for(LlamaCppEngine()).fixed_length_fields(32) == {"max_tokens": 32, "min_tokens": 32}


def test_vllm_launch_and_fixed_length():
    from llmflow.config import VllmEngine

    engine = VllmEngine(
        venv=Path("/v"),
        max_model_len=4096,
        gpu_memory_utilization=0.9,
        tensor_parallel_size=2,
        dtype="float32",
        extra_args=["--enforce-eager"],
    )
    spec = engines.spec_for(engine).launch(ModelConfig(path=Path("/m/ckpt"), served_name="m"), "0.0.0.0", "k")
    argv = spec.argv
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in [
        ("--model", "/m/ckpt"),
        ("--served-model-name", "m"),
        ("--max-model-len", "4096"),
        ("--gpu-memory-utilization", "0.9"),
        ("--tensor-parallel-size", "2"),
        ("--dtype", "float32"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert argv[-1] == "--enforce-eager" and "k" not in argv
    assert spec.env == {"VLLM_API_KEY": "k"}
    assert engines.spec_for(engine).readiness_path == "/health"
    assert engines.spec_for(engine).fixed_length_fields(8) == {"max_tokens": 8, "min_tokens": 8, "ignore_eos": True}


def test_slurm_script_exports_the_engines_key_variable():
    from llmflow.config import SlurmOptions
    from llmflow.placements import slurm_jobs as slurm

    script = slurm.render_job_script(
        opts=SlurmOptions(),
        job_name="j",
        run_dir="/r",
        setup=[],
        server_python="/p",
        server_argv=["x"],
        bind_host="0.0.0.0",
        launcher_source="pass\n",
        api_key_env="VLLM_API_KEY",
    )
    assert 'VLLM_API_KEY="$(cat api_key)"; export VLLM_API_KEY' in script


def test_prometheus_counters_are_summed_over_labels_and_diffed():
    from llmflow.engines.figures import counter_delta, parse_prometheus_counters

    text = (
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 31.0\n'
        'vllm:prompt_tokens_total{engine="1",model_name="m"} 9.0\n'
        'vllm:generation_tokens_total{engine="0",model_name="m"} 40.0\n'
        'vllm:prompt_tokens_created{engine="0"} 1.7e+09\n'
    )
    before = parse_prometheus_counters(text)
    assert before == {"prompt_tokens": 40.0, "generation_tokens": 40.0}
    after = {"prompt_tokens": 140.0, "generation_tokens": 120.0}
    assert counter_delta(before, after) == {"prompt_tokens": 100.0, "generation_tokens": 80.0}
    assert counter_delta(None, after) is None


def test_llama_server_launch_key_in_env_metrics_on_and_ignore_eos():
    from llmflow.config import LlamaServerEngine

    engine = LlamaServerEngine(
        binary=Path("/opt/llama.cpp/llama-server"), n_ctx=4096, parallel=4, extra_args=["--flash-attn", "on"]
    )
    spec = engines.spec_for(engine).launch(ModelConfig(path=Path("/m/x.gguf"), served_name="m"), "0.0.0.0", "k")
    argv = spec.argv
    assert argv[0] == "/opt/llama.cpp/llama-server"
    for flag, value in [
        ("--model", "/m/x.gguf"),
        ("--alias", "m"),
        ("--host", "0.0.0.0"),
        ("--port", "{port}"),
        ("--ctx-size", "4096"),
        ("--parallel", "4"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert "--metrics" in argv and argv[-2:] == ["--flash-attn", "on"] and "k" not in argv
    assert spec.env == {"LLAMA_API_KEY": "k"}
    assert engines.spec_for(engine).readiness_path == "/health" and engines.spec_for(engine).metrics_path == "/metrics"
    assert engines.spec_for(engine).fixed_length_fields(5) == {"max_tokens": 5, "ignore_eos": True}
    assert engines.spec_for(LlamaServerEngine(metrics=False)).metrics_path is None
    assert engines.spec_for(engine).server_python() == Path("python3")  # the supervisor runs under the node's python3


def test_command_engine_fills_placeholders_and_takes_its_settings_from_the_config():
    from llmflow.config import CommandEngine

    engine = CommandEngine(
        argv=["uvicorn", "app:api", "--host", "{host}", "--port", "{port}", "--model={model}", "{served_name}"],
        readiness_path="/healthz",
        api_key_env="APP_KEY",
        fixed_length=["ignore_eos"],
        metrics_path="/metrics",
    )
    spec = engines.spec_for(engine).launch(ModelConfig(path=Path("/m/w"), served_name="m"), "127.0.0.1", "k")
    assert spec.argv == ["uvicorn", "app:api", "--host", "127.0.0.1", "--port", "{port}", "--model=/m/w", "m"]
    assert spec.env == {"APP_KEY": "k"}
    assert engines.spec_for(engine).readiness_path == "/healthz" and engines.spec_for(engine).metrics_path == "/metrics"
    assert engines.spec_for(engine).fixed_length_fields(3) == {"max_tokens": 3, "ignore_eos": True}
    keyless = CommandEngine(argv=["srv", "--port={port}"])
    assert not (engines.spec_for(keyless).api_key_env is not None)
    assert engines.spec_for(keyless).launch(ModelConfig(), "h", None).env == {}


def test_command_engine_config_errors_name_the_field():
    import pytest
    from pydantic import ValidationError

    from llmflow.config import SessionConfig

    with pytest.raises(ValidationError, match=r"(?s)engine\.command.*argv must contain \{port\}"):
        SessionConfig.model_validate({"engine": {"kind": "command", "argv": ["srv", "--port", "8000"]}})
    with pytest.raises(ValidationError, match=r"engine\.command\.readiness_path"):
        SessionConfig.model_validate(
            {"engine": {"kind": "command", "argv": ["srv", "{port}"], "readiness_path": "healthz"}}
        )
    with pytest.raises(ValidationError, match=r"engine\.llama_server\.n_ctx"):
        SessionConfig.model_validate({"engine": {"kind": "llama_server", "n_ctx": 1}})


def test_check_installed_names_the_missing_piece(tmp_path: Path):
    import pytest

    from llmflow.config import CommandEngine, LlamaServerEngine

    with pytest.raises(ValueError, match=r"engine\.binary: .*not an executable"):
        engines.spec_for(LlamaServerEngine(binary=tmp_path / "nope")).check_installed()
    with pytest.raises(ValueError, match=r"engine\.argv\[0\]"):
        engines.spec_for(CommandEngine(argv=["no-such-server-xyz", "{port}"])).check_installed()
    with pytest.raises(ValueError, match=r"engine\.launcher_python"):
        engines.spec_for(CommandEngine(argv=["sh", "{port}"], launcher_python="no-such-python-xyz")).check_installed()
    engines.spec_for(CommandEngine(argv=["sh", "{port}"])).check_installed()


def test_llama_server_counters_are_read_like_vllms():
    from llmflow.engines.figures import parse_prometheus_counters

    text = (
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 120\n"
        "llamacpp:tokens_predicted_total 48\n"
        "llamacpp:prompt_seconds_total 0.5\n"
    )
    assert parse_prometheus_counters(text) == {"prompt_tokens": 120.0, "generation_tokens": 48.0}


def test_server_timings_are_summed_and_turned_into_rates():
    from llmflow.engines.figures import add_timings, timings_summary

    sums: dict[str, float] = {}
    add_timings(sums, {"prompt_n": 10, "prompt_ms": 5.0, "predicted_n": 8, "predicted_ms": 40.0, "cache_n": 0})
    add_timings(sums, {"prompt_n": 30, "prompt_ms": 15.0, "predicted_n": 8, "predicted_ms": 40.0})
    assert timings_summary(sums) == {
        "cache_n": 0,
        "prompt_n": 40,
        "prompt_ms": 20.0,
        "predicted_n": 16,
        "predicted_ms": 80.0,
        "prefill_tok_per_s": 2000.0,
        "decode_tok_per_s": 200.0,
    }
    assert timings_summary({}) is None


def test_embeddings_flags_of_the_engines_that_serve_them_beside_generation():
    from llmflow.config import LlamaServerEngine

    off = engines.spec_for(LlamaCppEngine()).launch(ModelConfig(), "h", None).argv
    on = engines.spec_for(LlamaCppEngine(embeddings=True)).launch(ModelConfig(), "h", None).argv
    assert "--embedding" not in off and on[on.index("--embedding") + 1] == "True"
    server = engines.spec_for(LlamaServerEngine(embeddings=True, pooling="mean")).launch(ModelConfig(), "h", None)
    assert "--embeddings" in server.argv and server.argv[server.argv.index("--pooling") + 1] == "mean"
    plain = engines.spec_for(LlamaServerEngine()).launch(ModelConfig(), "h", None).argv
    assert "--embeddings" not in plain and "--pooling" not in plain
    assert engines.spec_for(LlamaCppEngine()).embeddings_beside_generation is True
    assert engines.spec_for(LlamaServerEngine()).embeddings_beside_generation is True


def test_vllm_refuses_embeddings_beside_generation_naming_the_field():
    import pytest

    from llmflow.config import SessionConfig, VllmEngine
    from llmflow.validation import config_problems

    assert engines.spec_for(VllmEngine()).embeddings_beside_generation is False
    with pytest.raises(Exception) as exc:
        SessionConfig.model_validate({"engine": {"kind": "vllm", "embeddings": True}})
    (problem,) = config_problems(exc.value, SessionConfig, "session.")
    assert problem.startswith("session.engine.embeddings: vLLM serves generation or embeddings, never both")

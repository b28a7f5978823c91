from pathlib import Path

from llmflow import engines
from llmflow.batch_io import summary_path_for
from llmflow.config import LlamaCppEngine, ModelConfig
from llmflow.gate import classify
from llmflow.metrics import tok_per_s
from llmflow.placements import launch_script
from llmflow.results import BatchReport


def test_api_key_goes_in_env_never_in_argv():
    spec = engines.launch_spec(LlamaCppEngine(), ModelConfig(), "127.0.0.1", "s3cret")
    assert "s3cret" not in " ".join(spec.argv)
    assert spec.env == {"API_KEY": "s3cret"}
    assert engines.PORT_PLACEHOLDER in spec.argv


def test_launch_script_quotes_paths_and_keeps_setup_lines():
    engine = LlamaCppEngine(venv=Path("/opt/my env"), setup=["module load cuda", "export HF_HOME=/scratch/hf"])
    spec = engines.launch_spec(engine, ModelConfig(path=Path("/m/a b.gguf")), "127.0.0.1", None)
    script = launch_script(spec, engine.python, Path("/r/endpoint.json"), "127.0.0.1")
    lines = script.splitlines()
    assert lines[:3] == ["set -e", "module load cuda", "export HF_HOME=/scratch/hf"]
    assert "'/opt/my env/bin/python'" in lines[3] and "'/m/a b.gguf'" in lines[3]
    assert lines[3].startswith("exec ")


def test_fixed_length_uses_min_tokens():
    assert engines.fixed_length_fields(LlamaCppEngine(), 32) == {"max_tokens": 32, "min_tokens": 32}


def test_gate_classification():
    assert classify(None) == "loading"
    assert classify(503) == "loading"
    assert classify(200) == "ready"
    assert classify(401) == "fatal"


def test_tok_per_s_counts_only_this_pass(tmp_path: Path):
    report = BatchReport(
        input_path=tmp_path / "i", output_path=tmp_path / "o.jsonl", errors_path=tmp_path / "e",
        input_lines=10, already_done=4, sent=6, succeeded=5, failed_http=1, unfinished=0, invalid_lines=0,
        prompt_tokens=100, completion_tokens=50, wall_s=2.0, retries=0,
    )
    t = tok_per_s(report, summary_path_for(report.output_path))
    assert t.requests == 6 and t.requests_per_s == 3.0
    assert t.output_tok_per_s == 25.0 and t.total_tok_per_s == 75.0
    assert t.summary_path.name == "o.summary.json"


def test_vllm_launch_and_fixed_length():
    from llmflow.config import VllmEngine

    engine = VllmEngine(venv=Path("/v"), max_model_len=4096, gpu_memory_utilization=0.9, tensor_parallel_size=2,
                        dtype="float32", extra_args=["--enforce-eager"])
    spec = engines.launch_spec(engine, ModelConfig(path=Path("/m/ckpt"), served_name="m"), "0.0.0.0", "k")
    argv = spec.argv
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in [("--model", "/m/ckpt"), ("--served-model-name", "m"), ("--max-model-len", "4096"),
                        ("--gpu-memory-utilization", "0.9"), ("--tensor-parallel-size", "2"), ("--dtype", "float32")]:
        assert argv[argv.index(flag) + 1] == value
    assert argv[-1] == "--enforce-eager" and "k" not in argv
    assert spec.env == {"VLLM_API_KEY": "k"}
    assert engines.readiness_path(engine) == "/health"
    assert engines.fixed_length_fields(engine, 8) == {"max_tokens": 8, "min_tokens": 8, "ignore_eos": True}


def test_slurm_script_exports_the_engines_key_variable():
    from llmflow import slurm
    from llmflow.config import SlurmOptions

    script = slurm.render_job_script(
        opts=SlurmOptions(), job_name="j", run_dir="/r", setup=[], server_python="/p", server_argv=["x"],
        bind_host="0.0.0.0", launcher_source="pass\n", api_key_env="VLLM_API_KEY",
    )
    assert 'VLLM_API_KEY="$(cat api_key)"; export VLLM_API_KEY' in script


def test_prometheus_counters_are_summed_over_labels_and_diffed():
    from llmflow.metrics import counter_delta, parse_prometheus_counters

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

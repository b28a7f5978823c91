"""One rule for relative paths: a config file's folder; the working directory for flags and
flow parameters; the login's home for paths on a remote host; never the run folder."""

from __future__ import annotations

from pathlib import Path

from llmflow.config import SessionConfig, VllmEngine
from llmflow.engines import spec_for
from llmflow.errors import ConfigError
from llmflow.paths import local_server_paths, resolve_batch, resolve_session
from llmflow.remote.start_script import server_start_lines

BASE = Path("/etc/llmflow-configs")


def test_local_placement_paths_are_taken_from_the_files_folder(tmp_path: Path):
    (tmp_path / "models" / "tiny-llama-hf").mkdir(parents=True)  # else vLLM's 'org/name' would be a model name
    data = {
        "engine": {"kind": "vllm", "venv": ".venvs/vllm"},
        "model": {"path": "models/tiny-llama-hf"},
        "runs_dir": "runs",
        "api_key_file": "/abs/key",
    }
    out = resolve_session(data, tmp_path)
    assert out["engine"]["venv"] == str(tmp_path / ".venvs/vllm")
    assert out["model"]["path"] == str(tmp_path / "models/tiny-llama-hf")
    assert out["runs_dir"] == str(tmp_path / "runs")
    assert out["api_key_file"] == "/abs/key"
    assert data["engine"]["venv"] == ".venvs/vllm"  # the input is not changed


def test_remote_engine_and_model_paths_are_left_for_the_host_but_login_files_are_local():
    data = {
        "placement": {"kind": "slurm", "login": {"host": "h", "key_file": "keys/id"}, "remote_runs_dir": "runs"},
        "engine": {"venv": "venvs/llama"},
        "model": {"path": "models/m.gguf"},
    }
    out = resolve_session(data, BASE)
    assert out["engine"]["venv"] == "venvs/llama" and out["model"]["path"] == "models/m.gguf"
    assert out["placement"]["login"]["key_file"] == str(BASE / "keys/id")
    assert out["placement"]["remote_runs_dir"] == "runs"


def test_a_vllm_model_name_stays_a_name_and_home_is_expanded():
    out = resolve_session({"engine": {"kind": "vllm"}, "model": {"path": "Qwen/Qwen2.5-0.5B"}}, BASE)
    assert out["model"]["path"] == "Qwen/Qwen2.5-0.5B"
    out = resolve_session({"model": {"path": "~/m.gguf"}}, BASE)
    assert out["model"]["path"] == str(Path.home() / "m.gguf")
    out = resolve_session({"model": {"path": "Qwen/Qwen2.5-0.5B"}}, BASE)  # llama.cpp: a path
    assert out["model"]["path"] == str(BASE / "Qwen/Qwen2.5-0.5B")


def test_batch_paths_are_taken_from_the_files_folder():
    out = resolve_batch({"input_path": "in.jsonl", "output_path": "/o/out.jsonl", "concurrency": 4}, BASE)
    assert out == {"input_path": str(BASE / "in.jsonl"), "output_path": "/o/out.jsonl", "concurrency": 4}


def test_the_local_server_never_resolves_a_path_against_its_run_folder(tmp_path: Path):
    config = SessionConfig.model_validate({"engine": {"kind": "vllm", "venv": "v"}, "model": {"path": "m"}})
    fixed = local_server_paths(config, tmp_path)
    assert fixed.engine.venv == tmp_path / "v" and fixed.model.path == tmp_path / "m"
    assert spec_for(fixed.engine).server_python() == tmp_path / "v" / "bin" / "python"


def test_vllm_takes_a_hugging_face_name_or_a_folder_but_not_a_missing_path(tmp_path: Path):
    spec = spec_for(VllmEngine())
    spec.check_model(Path("Qwen/Qwen2.5-0.5B-Instruct"))
    spec.check_model(tmp_path)
    for missing in (tmp_path / "nope", Path("models/tiny/nope")):  # org/name would be a model name
        try:
            spec.check_model(missing)
        except ConfigError as exc:
            assert str(exc).startswith("model.path:")
        else:
            raise AssertionError(f"{missing} was accepted")


def test_the_remote_start_script_takes_relative_paths_from_home_not_the_run_folder():
    lines = server_start_lines(
        run_dir="/scratch/runs/r1",
        setup=["source venvs/x/bin/activate"],
        server_python="venvs/x/bin/python",
        server_argv=["--model", "models/m.gguf"],
        bind_host="0.0.0.0",
        launcher_source="print(1)",
        api_key_env="API_KEY",
    )
    home = lines.index(next(x for x in lines if x.startswith("cd ~")))
    assert lines.index("cd /scratch/runs/r1") < home < lines.index("source venvs/x/bin/activate")
    assert lines[-1].startswith("exec venvs/x/bin/python")


def test_llama_cpp_engines_refuse_what_is_not_a_gguf_file(tmp_path: Path):
    from llmflow.config import LlamaCppEngine, LlamaServerEngine
    from llmflow.tiny_model import write_tiny_llama

    broken = tmp_path / "broken.gguf"
    broken.write_text("garbage")
    good = write_tiny_llama(tmp_path / "tiny.gguf")
    for engine in (LlamaCppEngine(), LlamaServerEngine()):
        spec = spec_for(engine)
        spec.check_model(good)
        for bad, says in (
            (broken, "is not a GGUF file"),
            (tmp_path, "is a folder"),
            (tmp_path / "no.gguf", "does not exist"),
        ):
            try:
                spec.check_model(bad)
            except ConfigError as exc:
                assert str(exc).startswith(f"model.path: {bad}") and says in str(exc)
            else:
                raise AssertionError(f"{bad} was accepted")

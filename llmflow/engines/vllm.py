"""vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import ENGINES, PORT_PLACEHOLDER, LaunchSpec, VenvEngine, key_env
from llmflow.errors import ConfigError
from llmflow.paths import is_model_name


@ENGINES.register("vllm")
class VllmSpec(VenvEngine):
    """Its HTTP server (and /health) comes up only after the engine is initialised; it takes
    the key from ``VLLM_API_KEY``; ``ignore_eos`` fixes output length."""

    readiness_path = "/health"
    api_key_env = "VLLM_API_KEY"
    metrics_path = "/metrics"  # Prometheus text; token counters are vllm:*_tokens_total
    # one --runner per server: generate (no /v1/embeddings: 404) or pooling (no completions: 404)
    embeddings_beside_generation = False

    def check_model(self, path: Path) -> None:
        """A checkpoint folder, or a Hugging Face model name (``org/name``) that vLLM loads itself:
        from its cache, or downloaded unless ``HF_HUB_OFFLINE=1``."""
        if not path.exists() and not is_model_name(str(path)):
            raise ConfigError(
                f"model.path: {path} is neither a checkpoint folder nor a Hugging Face model name (org/name)"
            )

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        # flags and their values in pairs
        # fmt: off
        argv = [
            str(self.server_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model.path), "--served-model-name", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER,
            "--tensor-parallel-size", str(engine.tensor_parallel_size),
            "--pipeline-parallel-size", str(engine.pipeline_parallel_size),
        ]
        # fmt: on
        if engine.max_model_len is not None:
            argv += ["--max-model-len", str(engine.max_model_len)]
        if engine.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
        if engine.dtype:
            argv += ["--dtype", engine.dtype]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"model": served_name, "prompt": text}  # add_special_tokens defaults to true

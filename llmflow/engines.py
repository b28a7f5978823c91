"""What each engine needs: its command line, its readiness signal, fixed output length.

One small class per engine behind one interface (``EngineSpec``), chosen by the config's
``kind``. Pure functions of the config, so they are unit-tested without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llmflow.config import LlamaCppEngine, ModelConfig, VllmEngine

PORT_PLACEHOLDER = "{port}"


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a server: argv (with ``{port}`` for the launcher to fill) and extra env.

    The API key travels in ``env``, never in ``argv``: any user can read another's command
    line in /proc, but not its environment.
    """

    argv: list[str]
    env: dict[str, str]
    setup: list[str]


class EngineSpec(Protocol):
    readiness_path: ClassVar[str]
    api_key_env: ClassVar[str | None]
    metrics_path: ClassVar[str | None]

    def launch(self, engine: Any, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec: ...

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]: ...


class LlamaCppSpec:
    """llama-cpp-python's server: settings from flags, or by field name from the environment.

    It has no /health: /v1/models answers only once the model is loaded. No ``ignore_eos``;
    ``min_tokens`` suppresses EOS until reached.
    """

    readiness_path = "/v1/models"
    api_key_env = "API_KEY"
    metrics_path = None  # llama-cpp-python's server has no /metrics

    def launch(self, engine: LlamaCppEngine, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        argv = [
            str(engine.python), "-m", "llama_cpp.server",
            "--model", str(model.path), "--model_alias", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER, "--n_ctx", str(engine.n_ctx),
        ]
        if engine.n_threads is not None:
            argv += ["--n_threads", str(engine.n_threads)]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env={self.api_key_env: api_key} if api_key else {}, setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens}


class VllmSpec:
    """vLLM's OpenAI server: its HTTP server (and /health) comes up only after the engine is
    initialised; it takes the key from ``VLLM_API_KEY``; ``ignore_eos`` fixes output length."""

    readiness_path = "/health"
    api_key_env = "VLLM_API_KEY"
    metrics_path = "/metrics"  # Prometheus text; token counters are vllm:*_tokens_total

    def launch(self, engine: VllmEngine, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        argv = [
            str(engine.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model.path), "--served-model-name", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER,
            "--tensor-parallel-size", str(engine.tensor_parallel_size),
            "--pipeline-parallel-size", str(engine.pipeline_parallel_size),
        ]
        if engine.max_model_len is not None:
            argv += ["--max-model-len", str(engine.max_model_len)]
        if engine.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
        if engine.dtype:
            argv += ["--dtype", engine.dtype]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env={self.api_key_env: api_key} if api_key else {}, setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}


_SPECS: dict[str, EngineSpec] = {"llama_cpp": LlamaCppSpec(), "vllm": VllmSpec()}


def spec_for(engine: Any) -> EngineSpec:
    try:
        return _SPECS[engine.kind]
    except (KeyError, AttributeError):
        raise ValueError(f"engine.kind: unsupported engine {getattr(engine, 'kind', engine)!r}") from None


def launch_spec(engine: Any, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
    return spec_for(engine).launch(engine, model, host, api_key)


def accepts_api_key(engine: Any) -> bool:
    return spec_for(engine).api_key_env is not None


def api_key_env(engine: Any) -> str | None:
    return spec_for(engine).api_key_env


def readiness_path(engine: Any) -> str:
    return spec_for(engine).readiness_path


def fixed_length_fields(engine: Any, tokens: int) -> dict[str, Any]:
    """Body fields that make a completion exactly ``tokens`` long on this engine."""
    return spec_for(engine).fixed_length_fields(tokens)


def metrics_path(engine: Any) -> str | None:
    """Where the engine publishes its own counters, if it does."""
    return spec_for(engine).metrics_path


def server_python(engine: Any) -> Path:
    return engine.python

"""What each engine needs: its command line, its readiness signal, fixed output length.

One small class per engine behind one interface (``EngineSpec``), chosen by the config's
``kind``. Pure functions of the config, so they are unit-tested without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import os
import shutil
from collections.abc import Callable
from typing import Any, Protocol

from llmflow.config import CommandEngine, LlamaCppEngine, LlamaServerEngine, ModelConfig, VllmEngine

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
    """What the placements, the gate and the batch client ask of an engine (one per config)."""

    readiness_path: str
    api_key_env: str | None
    metrics_path: str | None

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec: ...

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]: ...

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None: ...


def _key_env(name: str | None, api_key: str | None) -> dict[str, str]:
    return {name: api_key} if name and api_key else {}


class LlamaCppSpec:
    """llama-cpp-python's server: settings from flags, or by field name from the environment.

    It has no /health: /v1/models answers only once the model is loaded. No ``ignore_eos``;
    ``min_tokens`` suppresses EOS until reached.
    """

    readiness_path = "/v1/models"
    api_key_env = "API_KEY"
    metrics_path = None  # llama-cpp-python's server has no /metrics

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.engine = engine

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        argv = [
            str(engine.python), "-m", "llama_cpp.server",
            "--model", str(model.path), "--model_alias", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER, "--n_ctx", str(engine.n_ctx),
            # its default (True) aborts a running stream when the next request arrives, so
            # concurrent streaming clients would cut each other off
            "--interrupt_requests", "False",
        ]
        if engine.n_threads is not None:
            argv += ["--n_threads", str(engine.n_threads)]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=_key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/extras/tokenize", {"input": text}  # counts BOS, as the completion does


class VllmSpec:
    """vLLM's OpenAI server: its HTTP server (and /health) comes up only after the engine is
    initialised; it takes the key from ``VLLM_API_KEY``; ``ignore_eos`` fixes output length."""

    readiness_path = "/health"
    api_key_env = "VLLM_API_KEY"
    metrics_path = "/metrics"  # Prometheus text; token counters are vllm:*_tokens_total

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
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
        return LaunchSpec(argv=argv, env=_key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"model": served_name, "prompt": text}  # add_special_tokens defaults to true


class LlamaServerSpec:
    """llama.cpp's native server: /health is 503 while the model loads and 200 once it can
    serve (/v1/models answers 200 too early); the key comes from ``LLAMA_API_KEY``;
    ``ignore_eos`` fixes output length; ``--metrics`` adds llamacpp:* counters, and every
    response carries the server's own ``timings``."""

    readiness_path = "/health"
    api_key_env = "LLAMA_API_KEY"

    def __init__(self, engine: LlamaServerEngine) -> None:
        self.engine = engine
        self.metrics_path = "/metrics" if engine.metrics else None

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        argv = [
            str(engine.binary), "--model", str(model.path), "--alias", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER, "--ctx-size", str(engine.n_ctx),
        ]
        if engine.n_threads is not None:
            argv += ["--threads", str(engine.n_threads)]
        if engine.parallel is not None:
            argv += ["--parallel", str(engine.parallel)]
        if engine.metrics:
            argv.append("--metrics")
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=_key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"content": text, "add_special": True}


class CommandSpec:
    """Any OpenAI-style server: everything the other specs know is given in the config."""

    def __init__(self, engine: CommandEngine) -> None:
        self.engine = engine
        self.readiness_path = engine.readiness_path
        self.api_key_env = engine.api_key_env
        self.metrics_path = engine.metrics_path

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        values = {"{host}": host, "{model}": str(model.path), "{served_name}": model.served_name}
        argv = []
        for part in self.engine.argv:
            for placeholder, value in values.items():
                part = part.replace(placeholder, value)
            argv.append(part)  # {port} stays: the supervisor fills it in on the node
        return LaunchSpec(argv=argv, env=_key_env(self.api_key_env, api_key), setup=list(self.engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"max_tokens": tokens}
        if "min_tokens" in self.engine.fixed_length:
            fields["min_tokens"] = tokens
        if "ignore_eos" in self.engine.fixed_length:
            fields["ignore_eos"] = True
        return fields

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return None  # unknown server: prompt lengths are calibrated from usage.prompt_tokens


_SPECS: dict[str, Callable[[Any], EngineSpec]] = {
    "llama_cpp": LlamaCppSpec,
    "vllm": VllmSpec,
    "llama_server": LlamaServerSpec,
    "command": CommandSpec,
}


def spec_for(engine: Any) -> EngineSpec:
    try:
        make = _SPECS[engine.kind]
    except (KeyError, AttributeError):
        raise ValueError(f"engine.kind: unsupported engine {getattr(engine, 'kind', engine)!r}") from None
    return make(engine)


def launch_spec(engine: Any, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
    return spec_for(engine).launch(model, host, api_key)


def accepts_api_key(engine: Any) -> bool:
    return spec_for(engine).api_key_env is not None


def api_key_env(engine: Any) -> str | None:
    return spec_for(engine).api_key_env


def readiness_path(engine: Any) -> str:
    return spec_for(engine).readiness_path


def fixed_length_fields(engine: Any, tokens: int) -> dict[str, Any]:
    """Body fields that make a completion exactly ``tokens`` long on this engine."""
    return spec_for(engine).fixed_length_fields(tokens)


def tokenize_request(engine: Any, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
    """Path and body that make the server count ``text``'s tokens, or None if it has no such API."""
    return spec_for(engine).tokenize_request(text, served_name)


def stream_usage(engine: Any) -> bool:
    """Whether streamed completions end with a ``usage`` chunk (``stream_options.include_usage``).
    llama-cpp-python's server ignores the option, so there the client counts text chunks."""
    return engine.kind != "llama_cpp"


def metrics_path(engine: Any) -> str | None:
    """Where the engine publishes its own counters, if it does."""
    return spec_for(engine).metrics_path


def server_python(engine: Any) -> Path:
    """The Python that runs the supervisor: the engine's venv, or a python3 on the node for binaries."""
    return engine.python


def check_installed(engine: Any) -> None:
    """For placements on this machine: fail before starting anything if the server cannot be found."""
    if engine.kind in ("llama_cpp", "vllm"):
        if not engine.python.exists():
            raise ValueError(
                f"engine.venv: {engine.venv} has no bin/python; run `make setup` (scripts/setup.sh) "
                "or point engine.venv at the server's environment"
            )
        return
    if shutil.which(engine.launcher_python) is None:
        raise ValueError(f"engine.launcher_python: {engine.launcher_python!r} is not an executable on PATH")
    if engine.kind == "llama_server" and not os.access(engine.binary, os.X_OK):
        raise ValueError(
            f"engine.binary: {engine.binary} is not an executable file (scripts/build_llama_server.sh builds one)"
        )
    if engine.kind == "command" and shutil.which(engine.argv[0]) is None:
        raise ValueError(f"engine.argv[0]: {engine.argv[0]!r} is not an executable (absolute path or on PATH)")

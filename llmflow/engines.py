"""What each engine needs: its command line, its readiness signal, fixed output length.

Pure functions of the config, so they are unit-tested without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow.config import LlamaCppEngine, ModelConfig

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


def llama_cpp_launch(engine: LlamaCppEngine, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
    """llama-cpp-python's server reads its settings from flags or, by field name, from env."""
    argv = [
        str(engine.python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model.path),
        "--model_alias",
        model.served_name,
        "--host",
        host,
        "--port",
        PORT_PLACEHOLDER,
        "--n_ctx",
        str(engine.n_ctx),
    ]
    if engine.n_threads is not None:
        argv += ["--n_threads", str(engine.n_threads)]
    argv += engine.extra_args
    env = {"API_KEY": api_key} if api_key else {}
    return LaunchSpec(argv=argv, env=env, setup=list(engine.setup))


def launch_spec(engine: Any, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
    """Dispatch on the engine kind."""
    if isinstance(engine, LlamaCppEngine):
        return llama_cpp_launch(engine, model, host, api_key)
    raise ValueError(f"engine.kind: unsupported engine {getattr(engine, 'kind', engine)!r}")


def accepts_api_key(engine: Any) -> bool:
    """llama-cpp-python's server checks a bearer key when one is set."""
    return isinstance(engine, LlamaCppEngine)


def readiness_path(engine: Any) -> str:
    """llama-cpp-python's server has no /health; /v1/models answers only once the model is loaded."""
    return "/v1/models"


def fixed_length_fields(engine: Any, tokens: int) -> dict[str, Any]:
    """Body fields that make a completion exactly ``tokens`` long on this engine.

    llama-cpp-python has no ``ignore_eos``, but ``min_tokens`` suppresses EOS until reached.
    """
    return {"max_tokens": tokens, "min_tokens": tokens}


def server_python(engine: Any) -> Path:
    return engine.python

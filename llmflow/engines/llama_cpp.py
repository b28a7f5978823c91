"""llama-cpp-python's OpenAI server (``python -m llama_cpp.server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import ENGINES, PORT_PLACEHOLDER, LaunchSpec, VenvEngine, check_gguf, key_env


@ENGINES.register("llama_cpp")
class LlamaCppSpec(VenvEngine):
    """Settings from flags. It has no /health: /v1/models answers only once the model is
    loaded. No ``ignore_eos``; ``min_tokens`` suppresses EOS until reached."""

    readiness_path = "/v1/models"
    api_key_env = "API_KEY"
    metrics_path = None  # llama-cpp-python's server has no /metrics
    embeddings_beside_generation = True  # --embedding True; completions and chat still answered

    def check_model(self, path: Path) -> None:
        check_gguf(path)

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        # flags and their values in pairs
        # fmt: off
        argv = [
            str(self.server_python()), "-m", "llama_cpp.server",
            "--model", str(model.path), "--model_alias", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER, "--n_ctx", str(engine.n_ctx),
            # its default (True) aborts a running stream when the next request arrives, so
            # concurrent streaming clients would cut each other off
            "--interrupt_requests", "False",
        ]
        # fmt: on
        if engine.n_threads is not None:
            argv += ["--n_threads", str(engine.n_threads)]
        if engine.embeddings:  # /v1/embeddings beside generation, same server
            argv += ["--embedding", "True"]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/extras/tokenize", {"input": text}  # counts BOS, as the completion does

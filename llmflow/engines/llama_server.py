"""llama.cpp's native HTTP server binary (``llama-server``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import ENGINES, PORT_PLACEHOLDER, BinaryEngine, LaunchSpec, check_gguf, key_env
from llmflow.errors import ConfigError


@ENGINES.register("llama_server")
class LlamaServerSpec(BinaryEngine):
    """/health is 503 while the model loads and 200 once it can serve (/v1/models answers 200
    too early); the key comes from ``LLAMA_API_KEY``; ``ignore_eos`` fixes output length;
    ``--metrics`` adds llamacpp:* counters, and every response carries the server's own
    ``timings``."""

    readiness_path = "/health"
    api_key_env = "LLAMA_API_KEY"
    embeddings_beside_generation = True  # --embeddings (and a --pooling other than none)

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.metrics_path = "/metrics" if engine.metrics else None

    def check_model(self, path: Path) -> None:
        check_gguf(path)

    def check_program(self) -> None:
        if not os.access(self.engine.binary, os.X_OK):
            raise ConfigError(
                f"engine.binary: {self.engine.binary} is not an executable file (scripts/build_llama_server.sh builds one)"
            )

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        # flags and their values in pairs
        # fmt: off
        argv = [
            str(engine.binary), "--model", str(model.path), "--alias", model.served_name,
            "--host", host, "--port", PORT_PLACEHOLDER, "--ctx-size", str(engine.n_ctx),
        ]
        # fmt: on
        if engine.n_threads is not None:
            argv += ["--threads", str(engine.n_threads)]
        if engine.parallel is not None:
            argv += ["--parallel", str(engine.parallel)]
        if engine.metrics:
            argv.append("--metrics")
        if engine.embeddings:  # completions and chat still answered (unlike what --help suggests)
            argv.append("--embeddings")
        if engine.pooling is not None:
            argv += ["--pooling", engine.pooling]
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"content": text, "add_special": True}

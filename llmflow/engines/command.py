"""Any OpenAI-style server, started by a command line the config gives (seed 000's FastAPI app)."""

from __future__ import annotations

import shutil
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import ENGINES, BinaryEngine, LaunchSpec, key_env
from llmflow.errors import ConfigError


@ENGINES.register("command")
class CommandSpec(BinaryEngine):
    """Everything the other specs know is given in the config."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.readiness_path = engine.readiness_path
        self.api_key_env = engine.api_key_env
        self.metrics_path = engine.metrics_path
        self.embeddings_beside_generation = None  # unknown: /v1/embeddings lines are sent as they are

    def check_program(self) -> None:
        if shutil.which(self.engine.argv[0]) is None:
            raise ConfigError(
                f"engine.argv[0]: {self.engine.argv[0]!r} is not an executable (absolute path or on PATH)"
            )

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        values = {"{host}": host, "{model}": str(model.path), "{served_name}": model.served_name}
        argv = []
        for part in self.engine.argv:
            for placeholder, value in values.items():
                part = part.replace(placeholder, value)
            argv.append(part)  # {port} stays: the supervisor fills it in on the node
        return LaunchSpec(argv=argv, env=key_env(self.api_key_env, api_key), setup=list(self.engine.setup))

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"max_tokens": tokens}
        if "min_tokens" in self.engine.fixed_length:
            fields["min_tokens"] = tokens
        if "ignore_eos" in self.engine.fixed_length:
            fields["ignore_eos"] = True
        return fields

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return None  # unknown server: prompt lengths are calibrated from usage.prompt_tokens

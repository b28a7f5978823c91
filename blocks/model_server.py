"""A model server as a Prefect Block: which engine serves which weights, configured once.

Its fields are the session's ``engine`` and ``model`` (the same pydantic models), so a block
saved in the UI or in code drops into any session: ``ModelServer.load("llama3").apply(session)``.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from llmflow.config import Engine, LlamaCppEngine, ModelConfig, SessionConfig


class ModelServer(Block):
    """An engine (llama.cpp, llama-server, vLLM or any OpenAI-style command) and the model it serves.

    Attributes:
        engine: The server: its kind, environment or binary, setup lines and engine arguments.
        model: The weights on the node and the name clients address them by.
    """

    _block_type_name = "Model Server"
    _block_type_slug = "llmflow-model-server"
    _description = (
        "An llmflow model server: engine (llama.cpp, llama-server, vLLM, command), its arguments and the model."
    )
    _code_example = """
        from blocks import ModelServer
        from llmflow.config import SessionConfig

        server = ModelServer.load("BLOCK_NAME")
        session = server.apply(SessionConfig())
    """

    engine: Engine = Field(
        default_factory=LlamaCppEngine, description="The server: kind, environment, setup lines, arguments."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The weights on the node, and the served name.")

    def apply(self, session: SessionConfig) -> SessionConfig:
        """``session`` with this block's engine and model."""
        return session.model_copy(update={"engine": self.engine, "model": self.model})

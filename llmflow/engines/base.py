"""The engine interface: what placements, the gate, the batch client and campaigns ask of the
server software (its command line, readiness signal, fixed output length, counters).

One class per engine, registered by ``kind`` in ``ENGINES``; each takes its config model
(``llmflow.config``) and answers from it alone, so specs are unit-tested without starting
anything.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from llmflow.config import ModelConfig
from llmflow.errors import ConfigError
from llmflow.registry import Registry

PORT_PLACEHOLDER = "{port}"


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a server: argv (with ``{port}`` for the supervisor to fill) and extra env.

    The API key travels in ``env``, never in ``argv``: any user can read another's command
    line in /proc, but not its environment.
    """

    argv: list[str]
    env: dict[str, str]
    setup: list[str]


@dataclass(frozen=True)
class MultiNodeLaunch:
    """How an engine serves one model over the K nodes of one job (``placement.nodes``).

    ``style`` picks the job body (``llmflow.remote.multinode``): ``rpc``: ranks 1..K-1 start
    ``worker_argv`` (``{port}``, ``{bind_host}`` filled on each node), then the head starts with
    ``{workers}`` in its argv replaced by their ``host:port`` list; ``ray``: a Ray head on rank 0,
    ``worker_argv`` joins it from each other rank, then the head's server starts.
    """

    style: Literal["rpc", "ray"]
    head: LaunchSpec
    worker_argv: list[str]


class EngineSpec(Protocol):
    """What the rest of the project asks of an engine (one instance per engine config)."""

    readiness_path: str  # GET path that answers 2xx once the server can serve
    api_key_env: str | None  # environment variable the server reads its key from; None: no key
    metrics_path: str | None  # Prometheus counters, if the server publishes them
    # can one server answer /v1/embeddings beside generation (its config's ``embeddings`` turns it
    # on)? False: never; None: unknown (a command), lines are sent as they are
    embeddings_beside_generation: bool | None

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec: ...

    def launch_multinode(self, model: ModelConfig, host: str, api_key: str | None, nodes: int) -> MultiNodeLaunch: ...

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]: ...

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None: ...

    def server_python(self) -> Path: ...

    def check_installed(self) -> None: ...

    def check_model(self, path: Path) -> None: ...


def check_model_exists(path: Path) -> None:
    """Raise ``ConfigError`` naming ``model.path`` when the model is not on this machine."""
    if not path.exists():
        raise ConfigError(f"model.path: {path} does not exist (`llmflow make-model` writes the tiny one)")


def check_gguf(path: Path) -> None:
    """llama.cpp's engines load one GGUF file: refuse anything else before a server starts (it
    would die loading it, with a long traceback, after the allocation)."""
    check_model_exists(path)
    if path.is_dir():
        raise ConfigError(f"model.path: {path} is a folder; llama.cpp loads one GGUF file (vLLM takes a folder)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"model.path: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


ENGINES: Registry[Any] = Registry("engine")


def key_env(name: str | None, api_key: str | None) -> dict[str, str]:
    """The environment entry that hands the server its key, if it takes one."""
    return {name: api_key} if name and api_key else {}


def one_node_only(engine: Any, nodes: int) -> ConfigError:
    """The error for ``placement.nodes`` > 1 with an engine that serves a model on one node."""
    return ConfigError(
        f"placement.nodes: {nodes} nodes for one model needs an engine that splits a model over nodes "
        f"(llama_server: rpc-server workers; vllm: Ray); engine {getattr(engine, 'kind', engine)!r} serves on one node"
    )


class VenvEngine:
    """An engine that is a Python package: its venv's ``bin/python`` runs supervisor and server."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def launch_multinode(self, model: ModelConfig, host: str, api_key: str | None, nodes: int) -> MultiNodeLaunch:
        raise one_node_only(self.engine, nodes)

    def server_python(self) -> Path:
        return self.engine.venv / "bin" / "python"

    def check_installed(self) -> None:
        if not self.server_python().exists():
            raise ConfigError(
                f"engine.venv: {self.engine.venv} has no bin/python; run `make setup` (scripts/setup.sh) "
                "or point engine.venv at the server's environment"
            )

    def check_model(self, path: Path) -> None:
        check_model_exists(path)


class BinaryEngine:
    """An engine that is a program: a ``python3`` on the node runs the standard-library supervisor."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def launch_multinode(self, model: ModelConfig, host: str, api_key: str | None, nodes: int) -> MultiNodeLaunch:
        raise one_node_only(self.engine, nodes)

    def server_python(self) -> Path:
        return Path(self.engine.launcher_python)

    def check_installed(self) -> None:
        if shutil.which(self.engine.launcher_python) is None:
            raise ConfigError(f"engine.launcher_python: {self.engine.launcher_python!r} is not an executable on PATH")
        self.check_program()

    def check_model(self, path: Path) -> None:
        check_model_exists(path)

    def check_program(self) -> None:
        """Raise ``ConfigError`` naming the field when the server program cannot be run."""
        raise NotImplementedError

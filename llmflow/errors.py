"""Every error this project raises on purpose, in one hierarchy.

``LLMFlowError`` is the root. Below it, ``PermanentError`` marks what retrying the same step
cannot fix: a setting that is wrong, a job the scheduler refused, a server that died. Task
retry conditions test that one base (``is_permanent``) instead of knowing each placement's
exceptions, so a new placement's errors need no change to any task. Anything else (an SSH
hiccup, a timeout while a port was taken) is worth the task's retries.

Each class also derives from the built-in it used to be (``ValueError``, ``RuntimeError``,
``TimeoutError``), so code that catches those keeps working.

::

    LLMFlowError
    ├── PermanentError                  retrying the same step cannot help
    │   ├── ConfigError (ValueError)    a setting or input names something that is not there
    │   │   ├── CampaignFileError       a campaign file that does not validate
    │   │   ├── UnknownModel            a model name the catalog has not (and no default)
    │   │   └── NoSuchNodeLimit         session.node_limit names no Prefect concurrency limit
    │   ├── HostKeyRejected             the SSH host's key is not known
    │   ├── JobRejected                 the scheduler refused the job or it can never start
    │   ├── QueueTimeout (TimeoutError) still queued at the deadline; cancelled
    │   ├── ServerDied                  the server or its job ended; carries the log's tail
    │   └── GateFailed                  the server answers in a way waiting will not fix
    ├── CommandFailed                   a command on the login node or host failed (retryable)
    ├── UnfinishedRequests              a batch left requests unanswered; a rerun sends them
    └── CampaignIncomplete              cells not run because no server came up again
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class LLMFlowError(Exception):
    """Root of the project's errors."""


class PermanentError(LLMFlowError):
    """Retrying the same step cannot fix this; tasks fail at once instead of retrying."""


class ConfigError(PermanentError, ValueError):
    """A setting names something that is not there (a file, a binary, a field value); the
    message starts with the field's path, e.g. ``model.path: ... does not exist``."""


class CampaignFileError(ConfigError):
    """A campaign file that cannot be read or does not validate; the message names the field."""


class UnknownModel(ConfigError):
    """A request or ``--model`` names a model the catalog has not, and there is no default to
    fall back on; the message lists the catalog's names, with a "did you mean"."""


class NoSuchNodeLimit(ConfigError):
    """``session.node_limit`` names a concurrency limit the Prefect server does not have."""


class HostKeyRejected(PermanentError, RuntimeError):
    """The SSH host's key is not known; we refuse rather than trust it blindly."""


class JobRejected(PermanentError, RuntimeError):
    """The scheduler refused the job or will never run it; the same request cannot succeed."""


class QueueTimeout(PermanentError, TimeoutError):
    """The job was still waiting when the queue deadline passed; it was cancelled."""


class ServerDied(PermanentError, RuntimeError):
    """The server process (or its job) ended while we waited on it; carries the log's tail."""


class GateFailed(PermanentError, RuntimeError):
    """The server answered in a way that waiting will not fix (wrong key, bad request)."""


class CommandFailed(LLMFlowError, RuntimeError):
    """A command on the login node or host exited non-zero; often transient (a busy node)."""


class UnfinishedRequests(LLMFlowError, RuntimeError):
    """Some requests exhausted their retries; rerunning the same command retries only those."""


class CampaignIncomplete(LLMFlowError, RuntimeError):
    """Some cells could not be run (no server came up again); the outputs hold the rest."""


def is_permanent(exc: BaseException | None) -> bool:
    """True for errors no retry can fix: ours marked permanent, and pydantic's validation
    errors (a ``ValueError``: bad data stays bad)."""
    return isinstance(exc, (PermanentError, ValidationError))


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task unless its error is permanent."""
    return not is_permanent(state.result(raise_on_failure=False))

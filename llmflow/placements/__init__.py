"""Placements: where the server runs. One interface, one class per placement.

Each lifecycle task calls one method of the driver for the configured placement
(``preflight``, ``allocate``, ``warm``, ``tunnel``, ``check_alive``, ``recover``,
``teardown``), so adding a placement adds a class here and changes no task.
"""

from __future__ import annotations

from typing import Union

from llmflow.config import EndpointPlacement, LocalPlacement, SessionConfig, SlurmPlacement, SSHPlacement
from llmflow.placements.base import LAUNCHER, ServerDied, make_run_dir, write_secret
from llmflow.placements.endpoint import EndpointDriver
from llmflow.placements.local import LocalDriver, launch_script
from llmflow.placements.slurm import SlurmDriver
from llmflow.placements.ssh import SSHDriver

Driver = Union[LocalDriver, SlurmDriver, SSHDriver, EndpointDriver]


def driver_for(config: SessionConfig) -> Driver:
    if isinstance(config.placement, LocalPlacement):
        return LocalDriver(config)
    if isinstance(config.placement, SlurmPlacement):
        return SlurmDriver(config)
    if isinstance(config.placement, SSHPlacement):
        return SSHDriver(config)
    if isinstance(config.placement, EndpointPlacement):
        return EndpointDriver(config)
    raise ValueError(f"placement.kind: unsupported placement {config.placement.kind!r}")


__all__ = ["LAUNCHER", "ServerDied", "Driver", "EndpointDriver", "LocalDriver", "SlurmDriver", "SSHDriver", "driver_for", "launch_script", "make_run_dir", "write_secret"]

"""A Slurm cluster as a Prefect Block: configured once (in the UI or code), used by name.

The block has exactly the fields of ``llmflow.config.SlurmPlacement`` (the same pydantic
model serves plain-Python use), so ``SlurmCluster.load("della").placement()`` is what a
session config takes. The key passphrase is a ``SecretStr``: Prefect stores it as a secret
and shows it masked.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from llmflow.config import SlurmOptions, SlurmPlacement, SSHLogin


class SlurmCluster(Block):
    """A Slurm cluster reached through its login node (or directly, when the flow runs there).

    Attributes:
        login: How to SSH to the login node; empty when the flow runs on it.
        slurm: Resources every job asks for (partition, account, gres, time ...).
        remote_runs_dir: Run folders on the cluster's shared filesystem.
        bind_host: Interface the server binds on the compute node.
        connect_host: Address the login node uses for the compute node; default its hostname.
        queue_deadline_s: Cancel and fail if the job is still queued after this many seconds.
        poll_interval_s: Seconds between job-state polls.
    """

    _block_type_name = "Slurm Cluster"
    _block_type_slug = "llmflow-slurm-cluster"
    _description = "A Slurm cluster for llmflow model sessions: login node, SSH settings, resources."

    login: SSHLogin | None = Field(default=None, description="How to SSH to the login node; empty when the flow runs on it.")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="Resources every job asks for.")
    remote_runs_dir: str = Field(default="llmflow-runs", description="Run folders on the cluster (relative: under the login home).")
    bind_host: str = Field(default="0.0.0.0", description="Interface the server binds on the compute node.")
    connect_host: str | None = Field(default=None, description="Address the login node uses for the compute node.")
    queue_deadline_s: float = Field(default=3600.0, gt=0, description="Give up (and scancel) if still queued after this.")
    poll_interval_s: float = Field(default=2.0, gt=0, description="Seconds between job-state polls.")

    def placement(self) -> SlurmPlacement:
        """The session placement this block stands for."""
        return SlurmPlacement(
            login=self.login, slurm=self.slurm, remote_runs_dir=self.remote_runs_dir, bind_host=self.bind_host,
            connect_host=self.connect_host, queue_deadline_s=self.queue_deadline_s, poll_interval_s=self.poll_interval_s,
        )

"""A Slurm cluster as a Prefect Block: configured once (in the UI or code), used by name.

The block holds a ``SlurmPlacement``, the very model a session config takes, so a block and
an inline config are checked by the same rules. The key passphrase inside it is a
``SecretStr``: Prefect stores it as a secret and shows it masked.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from llmflow.config import SlurmPlacement


class SlurmCluster(Block):
    """A Slurm cluster reached through its login node (or directly, when the flow runs there).

    Attributes:
        placement: Login node, resources every job asks for, run folders on the cluster,
            addresses and polling: a session's Slurm placement.
    """

    _block_type_name = "Slurm Cluster"
    _block_type_slug = "llmflow-slurm-cluster"
    _description = "A Slurm cluster for llmflow model sessions: login node, SSH settings, resources."
    _code_example = """
        from blocks import SlurmCluster
        from llmflow.config import SessionConfig

        cluster = SlurmCluster.load("BLOCK_NAME")
        session = SessionConfig(placement=cluster.placement)
    """

    placement: SlurmPlacement = Field(
        default_factory=SlurmPlacement,
        description="Login node, resources, run folders and polling: the session placement this block stands for.",
    )

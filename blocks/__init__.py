"""Prefect Block types, editable in the Prefect UI and loadable by name in flows and the CLI.

Register them with the Prefect server once: ``prefect block register -m blocks``.
"""

from blocks.cluster import SlurmCluster
from blocks.model_server import ModelServer

__all__ = ["ModelServer", "SlurmCluster"]

"""Prefect Block types, editable in the Prefect UI and loadable by name in flows and the CLI."""

from blocks.cluster import SlurmCluster

__all__ = ["SlurmCluster"]

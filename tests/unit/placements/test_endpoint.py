"""The endpoint placement without a server: its config, what it allocates, and that it never
stops what it did not start."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from llmflow.config import EndpointPlacement, SessionConfig
from llmflow.placements import driver_for
from llmflow.placements.endpoint import EndpointDriver


@pytest.mark.parametrize(
    "placement",
    [
        {"kind": "endpoint", "base_url": "http://gpu-box:8000/v1"},  # base_url is without /v1
        {"kind": "endpoint"},
    ],
)
def test_invalid_endpoint_settings_name_base_url(placement):
    with pytest.raises(ValidationError, match="base_url"):
        SessionConfig.model_validate({"placement": placement})


def test_the_server_is_described_reached_directly_and_never_stopped(tmp_path: Path):
    config = SessionConfig(
        placement=EndpointPlacement(base_url="http://gpu-box:8000/", api_key=SecretStr("their-key")),
        runs_dir=tmp_path / "runs",
    )
    driver = driver_for(config)
    assert isinstance(driver, EndpointDriver)
    alloc = driver.allocate("r1")
    handle = driver.warm(alloc)
    assert (handle.host, handle.port, alloc.node) == ("gpu-box", 8000, "gpu-box")
    assert handle.auth_headers() == {"Authorization": "Bearer their-key"}
    assert stat.S_IMODE(handle.api_key_file.stat().st_mode) == 0o600  # kept like our own keys
    assert driver.tunnel(handle).base_url == "http://gpu-box:8000"
    assert driver.teardown(alloc).not_ours

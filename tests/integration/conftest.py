"""Fixtures the integration tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmflow.config import LlamaCppEngine, ModelConfig, SessionConfig


@pytest.fixture
def session_config(tmp_path: Path, server_env, prefect_api_url) -> SessionConfig:
    """A session whose run folders and model copy live in tmp_path, so its processes are findable."""
    venv, model = server_env
    local_model = tmp_path / "model" / "tiny.gguf"
    local_model.parent.mkdir()
    shutil.copy(model, local_model)
    return SessionConfig(
        engine=LlamaCppEngine(venv=venv),
        model=ModelConfig(path=local_model),
        runs_dir=tmp_path / "runs",
    )

"""`llmflow api serve` refuses to start when its batches could not run, saying why (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmflow.config import PROJECT_ROOT


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ.update(PREFECT_HOME=str(tmp_path / "prefect-home"), **env)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "api", "serve", "--data-dir", str(tmp_path / "data"), *args],
        env=environ,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, env, says",
    [
        ((), {}, "batches run on a Prefect server with a worker: set PREFECT_API_URL"),
        (
            (),
            {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
            "the Prefect API at http://127.0.0.1:9/api does not answer",
        ),
        (
            ("--catalog", "{catalog}"),
            {},
            "catalog {catalog}: models.tiny: give exactly one of config or model_server_block",
        ),
    ],
)
def test_serve_without_what_batches_need_exits_2(tmp_path: Path, args, env, says):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("[models.tiny]\n")
    result = _serve(tmp_path, *(a.format(catalog=catalog) for a in args), **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("llmflow api serve: " + says.format(catalog=catalog)), result.stderr
    assert "Traceback" not in result.stderr

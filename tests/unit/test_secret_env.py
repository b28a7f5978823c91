"""engine.secret_env: resolving values, and the file the start script sources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmflow import secret_env
from llmflow.config import SecretSource
from llmflow.errors import ConfigError
from llmflow.remote.start_script import server_start_lines

NASTY = 'it\'s a "tok$en" `x` \\ with\nnewline'


def test_values_come_from_the_environment_and_from_the_block_loader(monkeypatch):
    monkeypatch.setenv("MY_TOKEN_SOURCE", NASTY)
    monkeypatch.setattr(secret_env, "_block_loader", lambda name: f"block value of {name}")
    values = secret_env.resolve(
        {"A_TOKEN": SecretSource(env="MY_TOKEN_SOURCE"), "B_TOKEN": SecretSource(prefect_secret="hf")}
    )
    assert values == {"A_TOKEN": NASTY, "B_TOKEN": "block value of hf"}


def test_a_missing_source_names_the_field(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match=r"^engine.secret_env.A_TOKEN: the flow's environment has no variable"):
        secret_env.resolve({"A_TOKEN": SecretSource(env="NOT_SET_ANYWHERE")})

    def no_block(name: str) -> str:
        raise ValueError(f"Unable to find block document named {name}")

    monkeypatch.setattr(secret_env, "_block_loader", no_block)
    with pytest.raises(ConfigError, match=r"^engine.secret_env.B: no Prefect Secret block named 'gone'"):
        secret_env.resolve({"B": SecretSource(prefect_secret="gone")})


def test_the_start_script_sources_the_file_before_the_setup_lines(tmp_path: Path):
    """The real start-script lines, run by bash: the server's environment has the exact value,
    which is in no line of the script."""
    (tmp_path / secret_env.SECRET_ENV_FILE).write_text(secret_env.env_file({"A_TOKEN": NASTY}))
    lines = server_start_lines(
        run_dir=str(tmp_path),
        setup=[f'printf %s "$A_TOKEN" > {tmp_path}/seen_by_setup'],  # setup lines run in the home folder
        server_python="python3",
        server_argv=["true"],
        bind_host="127.0.0.1",
        launcher_source="",
        api_key_env=None,
    )
    script = "\n".join(lines[: lines.index("# --- end of setup lines ---") + 1])
    assert NASTY not in script
    subprocess.run(["bash", "-c", script], check=True, cwd=tmp_path)
    assert (tmp_path / "seen_by_setup").read_text() == NASTY

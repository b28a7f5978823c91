"""engine.secret_env end to end: a server on the ssh host and on the Slurm cluster gets one
value from a Prefect Secret block and one from the flow's own environment; afterwards no file
the run wrote (local and remote run folders, outputs), nothing under PREFECT_HOME (persisted
results) and nothing in the Prefect database (parameters, logs, artifacts) holds either value."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows.session import model_session
from llmflow.config import CommandEngine, ModelConfig, SecretSource, SessionConfig
from tests.integration.test_engines_ssh import ssh_session  # noqa: F401 - fixture
from tests.integration.test_slurm import slurm_session  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

# A server that says whether its environment holds the expected values (by digest, so the
# values themselves are on no command line): standard library only, run by the node's python3.
SERVER = """
import hashlib, json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

host, port, expected = sys.argv[1], int(sys.argv[2]), dict(a.split("=", 1) for a in sys.argv[3:])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = {name: hashlib.sha256(os.environ.get(name, "").encode()).hexdigest() == digest
              for name, digest in expected.items()}
        body = json.dumps({"object": "list", "data": [{"id": "tiny-llama"}], "secret_ok": ok}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # the gate's test completion
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"choices": [{"text": "ok", "index": 0}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


HTTPServer((host, port), Handler).serve_forever()
"""


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _files_holding(roots: list[Path], values: list[str]) -> list[str]:
    needles = [v.encode() for v in values]
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                found += [f"{path}: value {i}" for i, needle in enumerate(needles) if needle in data]
    return found


@pytest.mark.parametrize("placement", ["ssh", "slurm"])
def test_secrets_reach_the_server_and_nothing_else(placement: str, request, tmp_path: Path, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    session: SessionConfig = request.getfixturevalue(f"{placement}_session")
    from_block, from_env = f"blk-{secrets.token_hex(16)}", f"env-{secrets.token_hex(16)}"
    block_name = f"test-token-{placement}"
    Secret(value=from_block).save(block_name, overwrite=True)
    monkeypatch.setenv("LLMFLOW_TEST_SOURCE_OF_B", from_env)
    script = tmp_path / "secret_server.py"
    script.write_text(SERVER)
    host = "{host}"
    session = session.model_copy(
        update={
            "engine": CommandEngine(
                argv=[
                    "python3",
                    str(script),
                    host,
                    "{port}",
                    f"A_TOKEN={_digest(from_block)}",
                    f"B_TOKEN={_digest(from_env)}",
                ],
                secret_env={
                    "A_TOKEN": SecretSource(prefect_secret=block_name),
                    "B_TOKEN": SecretSource(env="LLMFLOW_TEST_SOURCE_OF_B"),
                },
            ),
            "model": ModelConfig(path=script, served_name="tiny-llama"),
        }
    )
    seen: dict = {}

    @flow
    def probe() -> None:
        with model_session(session) as s:
            seen.update(httpx.get(s.tunnel.base_url + "/v1/models", timeout=10).json())
            remote = Path(s.allocation.remote_dir) / "secret_env"
            seen["file_mode"] = oct(remote.stat().st_mode & 0o777)

    probe()
    assert seen["secret_ok"] == {"A_TOKEN": True, "B_TOKEN": True}, seen
    assert seen["file_mode"] == "0o600"
    APILogWorker.drain_all(timeout=10)
    time.sleep(1)
    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    roots = [tmp_path, Path(PREFECT_HOME.value()), db.parent]
    assert _files_holding([db.parent], [block_name]), "the search must see the database (the block's name is in it)"
    assert _files_holding(roots, [from_block, from_env]) == []
    assert not list(tmp_path.rglob("secret_env")), "teardown removes the secrets file"
